"""Codec throughput and distortion: every kvslim codec and rate at d = 64, 128, 256, side by side with a plain
16-bit copy and with TurboQuant implementations from PyPI (benchmark-only, never runtime dependencies).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/quant.py            # full run
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/quant.py --quick    # small smoke run

Per (d, codec): encode and decode throughput (vectors/s, best of --repeats on the same N Gaussian vectors), the
stored bytes per vector (measured ``codec.nbytes`` / N), relative distortion ``sum ||x - x~||^2 / sum ||x||^2``
(for Gaussian inputs this is the unit-vector D_mse of the paper), and the inner-product slope
``sum(<q,x~><q,x>) / sum(<q,x>^2)`` over 64 random queries (1 = unbiased; MSE-optimal codes shrink it to ~1 - D_mse).
External rows (same vectors): ``pyturboquant-cpu`` (NumPy + SciPy; MSE and prod) and ``turbo-quant-lite`` (NumPy,
MSE only, codebook fixed for d = 512). Each is skipped with a message when not installed:
``pip install pyturboquant-cpu turbo-quant-lite``. Also: ``codec.score`` / ``codec.weighted_sum`` vs
decode-then-matmul on 4096 keys / values, and
the distortion on real keys/values of the embedded models (SmolLM2 d=64, Gemma 3 d=256; ``--no-real`` skips).
Prints tables, then one JSON line; writes results/quant.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvslim.quant import CODEC_NAMES, make_codec  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def metrics(x: torch.Tensor, xh: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
    x64, xh64, q64 = x.double(), xh.double(), q.double()
    rel = float(((xh64 - x64) ** 2).sum() / (x64**2).sum())
    true, est = q64 @ x64.T, q64 @ xh64.T
    slope = float((est * true).sum() / (true**2).sum())
    return rel, slope


def bench_kvslim(name: str, x: torch.Tensor, q: torch.Tensor, repeats: int) -> dict:
    n, d = x.shape
    kw = {"role": "value"} if name.startswith("kivi") else {}  # per-token KIVI: the value layout
    codec = make_codec(name, d, seed=0, **kw)
    te, packed = best_time(lambda: codec.encode(x), repeats)
    td, xh = best_time(lambda: codec.decode(packed), repeats)
    rel, slope = metrics(x, xh, q)
    return {
        "impl": "kvslim", "codec": name if not kw else f"{name}(value)", "d": d,
        "bits": round(codec.bits_per_value, 3), "bytes_per_vector": codec.nbytes(packed) / n,
        "encode_vps": n / te, "decode_vps": n / td, "rel_mse": rel, "ip_slope": slope,
    }


def bench_pyturboquant(kind: str, bits: int, x: torch.Tensor, q: torch.Tensor, repeats: int) -> dict | None:
    try:
        import pyturboquant_cpu as ptq
    except ImportError:
        return None
    n, d = x.shape
    xn = x.double().numpy()
    enc = ptq.quantize_mse if kind == "mse" else ptq.quantize_prod
    dec = ptq.dequantize_mse if kind == "mse" else ptq.dequantize_prod
    enc(xn[:2], bits, seed=0)  # warm its codebook cache (computed once per (d, b))
    te, packed = best_time(lambda: enc(xn, bits, seed=0), repeats)
    td, xh = best_time(lambda: dec(packed), 1 if kind == "prod" else repeats)
    mse_part = packed if kind == "mse" else packed.mse_component
    nbytes = mse_part.packed_indices.nbytes + mse_part.norms.nbytes
    if kind == "prod":
        nbytes += packed.packed_signs.nbytes + packed.residual_norms.nbytes
    rel, slope = metrics(x, torch.from_numpy(np.asarray(xh)).float(), q)
    return {
        "impl": "pyturboquant-cpu", "codec": f"tq{bits}" if kind == "mse" else f"tqprod{bits}", "d": d,
        "bits": float(bits), "bytes_per_vector": nbytes / n,
        "encode_vps": n / te, "decode_vps": n / td, "rel_mse": rel, "ip_slope": slope,
    }


def bench_tqlite(bits: int, x: torch.Tensor, q: torch.Tensor, repeats: int) -> dict | None:
    try:
        from turbo_quant_lite import TurboQuant
    except ImportError:
        return None
    n, d = x.shape
    xn = x.double().numpy()
    tq = TurboQuant(d, bits=bits, seed=0)
    te, (idx, norms) = best_time(lambda: tq.encode_batch(xn), repeats)
    td, xh = best_time(lambda: tq.decode_batch(idx, norms), repeats)
    rel, slope = metrics(x, torch.from_numpy(xh).float(), q)
    return {
        "impl": "turbo-quant-lite", "codec": f"tq{bits}", "d": d, "bits": float(bits),
        "bytes_per_vector": (idx.nbytes + norms.nbytes) / n,  # its batch API keeps one uint8 per code
        "encode_vps": n / te, "decode_vps": n / td, "rel_mse": rel, "ip_slope": slope,
    }


def bench_score(name: str, d: int, tokens: int, queries: int, repeats: int) -> dict:
    """``codec.score`` (from the codes) vs decode-then-matmul, same packed keys, one head."""
    g = torch.Generator().manual_seed(1)
    codec = make_codec(name, d, seed=0)
    packed = codec.encode(torch.randn(tokens, d, generator=g))
    q = torch.randn(queries, d, generator=g)
    w = torch.softmax(torch.randn(queries, tokens, generator=g), dim=-1)
    t_score, s = best_time(lambda: codec.score(q, packed), repeats)
    t_dec, ref = best_time(lambda: q @ codec.decode(packed).T, repeats)
    t_mix, m = best_time(lambda: codec.weighted_sum(w, packed), repeats)
    t_dmix, mref = best_time(lambda: w @ codec.decode(packed), repeats)
    ext = _external_score(name, d, packed, codec, q, repeats) if name in ("tq3", "tq4") else {}
    return {**ext, "codec": name, "d": d, "tokens": tokens, "queries": queries, "score_ms": 1e3 * t_score,
            "decode_matmul_ms": 1e3 * t_dec, "speedup": t_dec / t_score,
            "max_abs_diff": float((s - ref).abs().max()),
            "weighted_sum_ms": 1e3 * t_mix, "decode_mix_ms": 1e3 * t_dmix, "mix_speedup": t_dmix / t_mix,
            "mix_max_abs_diff": float((m - mref).abs().max())}


def _external_score(name: str, d: int, packed, codec, q: torch.Tensor, repeats: int) -> dict:
    """The PyPI packages' ways to score the same 4096 keys: turbo-quant-lite's ``similarity_batch`` (from its codes,
    one query at a time) and pyturboquant-cpu's dequantise-then-matmul. Empty where a package is not installed."""
    bits = int(name[2:])
    x = codec.decode(packed).double().numpy()
    qn = q.double().numpy()
    out = {}
    try:
        from turbo_quant_lite import TurboQuant

        tq = TurboQuant(d, bits=bits, seed=0)
        idx, norms = tq.encode_batch(x)
        t, _ = best_time(lambda: [tq.similarity_batch(qi, idx, norms) for qi in qn], repeats)
        out["tqlite_score_ms"] = 1e3 * t
    except ImportError:
        pass
    try:
        import pyturboquant_cpu as ptq

        pk = ptq.quantize_mse(x, bits, seed=0)
        t, _ = best_time(lambda: qn @ np.asarray(ptq.dequantize_mse(pk)).T, repeats)
        out["pyturboquant_decode_matmul_ms"] = 1e3 * t
    except ImportError:
        pass
    return out


REAL_CODECS = ("fp8", "fp4", "tq2", "tq2.5", "tq3", "tq3.5", "tq4", "tqprod3", "kivi2", "kivi4")


def real_kv(model_name: str, tokens: int) -> list[tuple[int, torch.Tensor, torch.Tensor]] | None:
    """Keys and values ``[heads, tokens, d]`` of every 6th layer of an embedded model on natural text."""
    try:
        import pydoc_data.topics

        from kvslim.models import load

        model, tok = load(model_name)
    except Exception as exc:  # model package missing: the section is skipped, with the reason
        print(f"skipped real KV of {model_name}: {exc}", file=sys.stderr)
        return None
    text = " ".join(list(pydoc_data.topics.topics.values())[:4])
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return [(i, layer.keys[0].float(), layer.values[0].float()) for i, layer in enumerate(cache.layers) if i % 6 == 0]


def bench_real(model_name: str, tokens: int) -> list[dict]:
    """Relative distortion on real keys/values; tq2.5/tq3.5 calibrated on the first half, measured on the second."""
    layers = real_kv(model_name, tokens)
    if layers is None:
        return []
    rows = []
    d = layers[0][1].shape[-1]
    for name in REAL_CODECS + ("tq2.5+cal", "tq3.5+cal"):
        errs = {"key": [], "value": []}
        for _, k, v in layers:
            for role, x in (("key", k), ("value", v)):
                half = x.shape[-2] // 2
                calib, test = x[:, :half], x[:, half : half + (x.shape[-2] - half) // 32 * 32]
                codec = make_codec(name.removesuffix("+cal"), d, seed=0, role=role)
                if name.endswith("+cal"):
                    codec.calibrate(calib)
                xh = codec.decode(codec.encode(test))
                errs[role].append(float(((xh - test) ** 2).sum() / (test**2).sum()))
        rows.append({"model": model_name, "d": d, "codec": name,
                     "bytes_per_vector_key": make_codec(name.removesuffix("+cal"), d).bytes_per_vector(),
                     "rel_mse_key": sum(errs["key"]) / len(errs["key"]),
                     "rel_mse_value": sum(errs["value"]) / len(errs["value"])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--n", type=int, default=8192, help="vectors per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="n=2048, repeats=1")
    ap.add_argument("--out", default="results/quant.json")
    ap.add_argument("--no-real", action="store_true", help="skip the real-KV section (embedded models)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 2048, 1
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dims = [int(v) for v in args.dims.split(",")]
    rows: list[dict] = []
    missing = []
    for d in dims:
        g = torch.Generator().manual_seed(d)
        x = torch.randn(args.n, d, generator=g)
        q = torch.randn(64, d, generator=g)
        for name in CODEC_NAMES:
            rows.append(bench_kvslim(name, x, q, args.repeats))
        for b in (1, 2, 3, 4):
            for r in (bench_pyturboquant("mse", b, x, q, args.repeats), bench_tqlite(b, x, q, args.repeats)):
                if r:
                    rows.append(r)
        for b in (2, 3, 4):
            r = bench_pyturboquant("prod", b, x, q, args.repeats)
            if r:
                rows.append(r)
    try:
        import pyturboquant_cpu  # noqa: F401
    except ImportError:
        missing.append("pyturboquant-cpu")
    try:
        import turbo_quant_lite  # noqa: F401
    except ImportError:
        missing.append("turbo-quant-lite")
    for m in missing:
        print(f"skipped {m}: not installed (benchmark-only: pip install {m})", file=sys.stderr)

    # ratios against the plain 16-bit copy and against the external implementations, same d and codec name
    base = {r["d"]: r for r in rows if r["impl"] == "kvslim" and r["codec"] == "fp16"}
    ours = {(r["d"], r["codec"]): r for r in rows if r["impl"] == "kvslim"}
    comparison = []
    for r in rows:
        r["encode_vs_fp16"] = r["encode_vps"] / base[r["d"]]["encode_vps"]
        r["decode_vs_fp16"] = r["decode_vps"] / base[r["d"]]["decode_vps"]
        if r["impl"] != "kvslim" and (r["d"], r["codec"]) in ours:
            k = ours[(r["d"], r["codec"])]
            comparison.append({
                "d": r["d"], "codec": r["codec"], "vs": r["impl"],
                "encode_speedup": k["encode_vps"] / r["encode_vps"],
                "decode_speedup": k["decode_vps"] / r["decode_vps"],
                "rel_mse_ours": k["rel_mse"], "rel_mse_theirs": r["rel_mse"],
                "bytes_ours": k["bytes_per_vector"], "bytes_theirs": r["bytes_per_vector"],
            })

    hdr = (f"{'d':>4} {'impl':<17}{'codec':<13}{'bits':>5} {'B/vec':>7} {'enc Mv/s':>9} {'dec Mv/s':>9} "
           f"{'enc/fp16':>9} {'dec/fp16':>9} {'rel MSE':>9} {'ip slope':>9}")
    print(f"N={args.n} vectors per measurement, best of {args.repeats}, threads={torch.get_num_threads()}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['d']:>4} {r['impl']:<17}{r['codec']:<13}{r['bits']:>5.2f} {r['bytes_per_vector']:>7.1f} "
              f"{r['encode_vps'] / 1e6:>9.3f} {r['decode_vps'] / 1e6:>9.3f} {r['encode_vs_fp16']:>9.3f} "
              f"{r['decode_vs_fp16']:>9.3f} {r['rel_mse']:>9.5f} {r['ip_slope']:>9.4f}")
    if comparison:
        print("\nkvslim vs external (same vectors): speedup = our vectors/s / theirs")
        for c in comparison:
            print(f"{c['d']:>4} {c['codec']:<9} vs {c['vs']:<17} encode x{c['encode_speedup']:7.2f}  "
                  f"decode x{c['decode_speedup']:7.2f}  rel MSE {c['rel_mse_ours']:.5f} vs {c['rel_mse_theirs']:.5f}  "
                  f"B/vec {c['bytes_ours']:.1f} vs {c['bytes_theirs']:.1f}")
    score_rows = []
    for d in dims:
        for name in ("tq3", "tq4", "tq2.5", "tqprod3", "fp8", "kivi4"):
            score_rows.append(bench_score(name, d, 4096 if not args.quick else 1024, 8, args.repeats))
    from kvslim.quant import kernels

    print("\nfrom the codes vs decode-then-matmul (one head, 8 queries): score(q, keys), weighted_sum(p, values); "
          f"compiled kernel: {'yes' if kernels.available() else 'no (PyTorch tables)'}")
    for r in score_rows:
        ext = "".join(f"   {k.removesuffix('_ms')} {r[k]:7.2f} ms" for k in ("tqlite_score_ms",
                      "pyturboquant_decode_matmul_ms") if k in r)  # fmt: skip
        print(f"{r['d']:>4} {r['codec']:<9} T={r['tokens']:<5} score {r['score_ms']:7.2f} ms vs {r['decode_matmul_ms']:7.2f} "
              f"(x{r['speedup']:4.2f})   weighted_sum {r['weighted_sum_ms']:7.2f} ms vs {r['decode_mix_ms']:7.2f} "
              f"(x{r['mix_speedup']:4.2f})   max |diff| {max(r['max_abs_diff'], r['mix_max_abs_diff']):.1e}{ext}")
    real_rows = []
    if not args.no_real:
        for model_name in ("smollm2-135m", "gemma3-270m"):
            real_rows += bench_real(model_name, 512 if not args.quick else 256)
    if real_rows:
        print("\nreal KV (every 6th layer, natural text; calibrated variants fit on the first half of the tokens)")
        for r in real_rows:
            print(f"{r['model']:<13} d={r['d']:<4} {r['codec']:<10} B/vec {r['bytes_per_vector_key']:6.1f}  "
                  f"rel MSE keys {r['rel_mse_key']:.5f}  values {r['rel_mse_value']:.5f}")
    result = {"bench": "quant", "n": args.n, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "kernel": kernels.available(),
              "torch": torch.__version__, "skipped": missing, "rows": rows, "comparison": comparison,
              "score": score_rows, "real_kv": real_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
