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
``pip install pyturboquant-cpu turbo-quant-lite``. Prints a table, then one JSON line; writes results/quant.json.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--n", type=int, default=8192, help="vectors per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="n=2048, repeats=1")
    ap.add_argument("--out", default="results/quant.json")
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
    result = {"bench": "quant", "n": args.n, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "skipped": missing, "rows": rows, "comparison": comparison}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
