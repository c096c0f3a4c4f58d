"""Native V4 attention (kvslim.nn) vs transformers 5.24's DeepseekV4Attention: decode ms/token, prefill s, bytes.

A stack of V4 attention layers (default layers SWA + CSA (m=4, top-k 512) + HCA (m'=128), window 128) joined by
residual sums, random weights, fp32, batch 1, at ``--width tiny`` (hidden 256, 4 heads of 64 with 16 RoPE dims,
q_lora 128, 2 output groups of rank 64, indexer 16 heads x 16) or ``--width flash`` (V4-Flash's attention shape:
hidden 4096, 64 heads of 512 with 64 RoPE dims, q_lora 1024, 8 groups of rank 1024, indexer 64 x 128). kvslim's
modules are built with ``from_transformers`` from the very transformers modules they are timed against, in the
same process, one after the other.

Per context N: both prefill N tokens (transformers only up to ``--hf-prefill-max``; beyond that its prefill is
skipped and said so), then both decode ``--decode-tokens`` tokens (timed after 2 warm-up tokens). Where
transformers' prefill was skipped, its decode runs on a cache copied from kvslim's state
(``hf_v4_cache_from_states``; tested to decode exactly like transformers' own cache), and the decode outputs of the
two are compared. ``--state random`` fills kvslim's state with random rows where N tokens would leave it instead of
a prefill (decode timing at widths and contexts whose prefill would take too long). Also reported: the matmul
FLOPs of one decode token of each (``torch.utils.flop_counter``), and kvslim's prefill split into the lightning
indexer (quadratic by definition) and the rest. Bytes: kvslim's ``V4State.nbytes()`` per token against the closed
form W*d + N/m*(d + d_I) + N/m'*d values + compressor state, checked against the planner
(``kvslim.plan.expected_cache_bytes(..., layout="plan")``, fp32 rows only), and transformers' cache bytes measured
by ``kvslim.cache_nbytes``.

    python bench/native_v4.py                  # default: 2k, 8k (about a minute)
    python bench/native_v4.py --contexts 2048,8192,32768,131072 --out results/native_v4_full.json   # ~4 min
    python bench/native_v4.py --width flash --state random --contexts 8192,32768,131072   # ~3 min, ~6 GB

Prints a table, then one JSON line; writes results/native_v4.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvslim.memory import cache_nbytes  # noqa: E402
from kvslim.nn import from_transformers  # noqa: E402
from kvslim.nn.hf_reference import (  # noqa: E402
    hf_attention,
    hf_v4_cache,
    hf_v4_cache_from_states,
    hf_v4_step,
    tiny_v4_config,
)
from kvslim.nn.storage import Fp4, Fp8DsV4  # noqa: E402
from kvslim.plan import expected_cache_bytes  # noqa: E402
from kvslim.plan.spec_hf import spec_from_config  # noqa: E402

KINDS = {"swa": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}


# attention widths: "tiny" (the default stack) and V4-Flash's real attention shape (../shared/reference:
# hidden 4096, 64 heads of 512 with 64 RoPE dims, q_lora 1024, 8 output groups of rank 1024, indexer 64 x 128)
WIDTHS = {
    "tiny": dict(hidden_size=256, num_attention_heads=4, head_dim=64, partial_rotary_factor=0.25, q_lora_rank=128,
                 o_groups=2, o_lora_rank=64, index_n_heads=16, index_head_dim=16),
    "flash": dict(hidden_size=4096, num_attention_heads=64, head_dim=512, partial_rotary_factor=0.125,
                  q_lora_rank=1024, o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128),
}


def bench_config(layers: list[str], topk: int, width: str = "tiny", **overrides):
    """The benchmarks' V4 config (also used by ``bench/native_v4_model.py``); ``overrides`` go to the config."""
    return tiny_v4_config(
        num_layers=len(layers), layer_types=[KINDS[k] for k in layers], sliding_window=128,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        index_topk=topk, **{**WIDTHS[width], **overrides},
    )


def build(layers: list[str], topk: int, width: str = "tiny"):
    cfg = bench_config(layers, topk, width)
    hf = [hf_attention(cfg, i, seed=100 + i) for i in range(len(layers))]
    ours = [from_transformers(m) for m in hf]
    return cfg, hf, ours


def ours_step(mods, states, x):
    with torch.no_grad():
        for m, st in zip(mods, states, strict=True):
            x = x + m(x, st)
    return x


@torch.no_grad()
def fill_random_states(mods, states, n: int, gen: torch.Generator) -> None:
    """Put each (empty, float) state where n tokens would leave it, with random rows instead of a prefill: the last W
    window rows, n // m compressed entries and indexer keys, an open window of n % m buffered projections and the
    overlap carry. Only for timing decode where a prefill would take too long (``--state random``): both
    implementations then decode from the same rows (transformers' cache is copied from these states)."""
    for m, st in zip(mods, states, strict=True):
        c = m.config
        pos = torch.arange(max(0, n - c.window), n)
        st.win_kv = torch.zeros((1, c.window, c.head_dim))
        st.win_pos = torch.full((c.window,), -1, dtype=torch.long)
        st.win_kv[:, pos % c.window] = torch.randn(1, len(pos), c.head_dim, generator=gen)
        st.win_pos[pos % c.window] = pos
        st.seen = n
        for comp, cst in ((m.compressor, st.compressor), (m.indexer.compressor if m.indexer else None, st.indexer)):
            if comp is None:
                continue
            width = comp.kv_proj.out_features
            cst.count, cst.fill = n // comp.rate, n % comp.rate
            cst.append(torch.randn(1, cst.count, comp.dim, generator=gen))
            cst.buf_kv = torch.randn(1, comp.rate, width, generator=gen)
            cst.buf_gate = torch.randn(1, comp.rate, width, generator=gen)
            if comp.overlap:
                cst.carry_kv = torch.randn(1, comp.rate, comp.dim, generator=gen)
                cst.carry_gate = torch.randn(1, comp.rate, comp.dim, generator=gen)


def decode_flops(step, *args) -> int:
    """Floating-point operations of ``step(*args)`` as counted by ``torch.utils.flop_counter`` (matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(*args)
    return counter.get_total_flops()


def time_indexers(mods) -> dict:
    """Wrap each CSA layer's lightning indexer (``indexer.select``: its key compressor, scoring every closed entry,
    top-k) so its wall time adds up in the returned dict's ``"s"``; the rest of a prefill is linear in N."""
    acc = {"s": 0.0}
    for m in mods:
        if m.indexer is None:
            continue
        inner = m.indexer.select

        def timed(*a, _inner=inner, **kw):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                acc["s"] += time.perf_counter() - t0

        m.indexer.select = timed
    return acc


def expected_bytes(cfg, layers: list[str], n: int, storage: str) -> int:
    """Closed-form bytes of kvslim's state after n tokens: window + entries + indexer keys (each row 4*d bytes, or
    the packed FP8-ds / FP4 row sizes) + the fp32 compressor buffers and overlap carries."""
    d, w, di = cfg.head_dim, cfg.sliding_window, cfg.index_head_dim
    row = Fp8DsV4(d, int(cfg.qk_rope_head_dim)).bytes_per_vector if storage == "v4" else 4 * d
    key = Fp4(di).bytes_per_vector if storage == "v4" else 4 * di
    total = 0
    for kind in layers:
        total += w * row
        if kind == "csa":
            m = cfg.compress_rates["compressed_sparse_attention"]
            total += (n // m) * (row + key) + 4 * (2 * m * (2 * d + 2 * di) + 2 * m * (d + di))
        elif kind == "hca":
            m = cfg.compress_rates["heavily_compressed_attention"]
            total += (n // m) * row + 4 * 2 * m * d
    return total


def opt(v, fmt: str) -> str:
    """``v`` formatted, or ``-`` where it was not measured."""
    return "-" if v is None else format(v, fmt)


def write_result(result: dict, path: str) -> None:
    """Write the run's JSON to ``path`` (parents created) and print it as one line."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="2048,8192", help="comma-separated context lengths")
    ap.add_argument("--layers", default="swa,csa,hca", help="layer kinds, comma-separated (swa, csa, hca)")
    ap.add_argument("--topk", type=int, default=512, help="CSA indexer top-k (V4-Flash: 512)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--hf-prefill-max", type=int, default=8192,
                    help="largest context at which transformers' prefill is run (it grows quadratically)")
    ap.add_argument("--hf-decode-max", type=int, default=1 << 30, help="largest context for transformers' decode")
    ap.add_argument("--storage", default="float", choices=["float", "v4"],
                    help="kvslim row storage: float (fp32, equal to transformers) or v4 (FP8-ds rows, FP4 keys)")
    ap.add_argument("--width", default="tiny", choices=sorted(WIDTHS),
                    help="attention width: tiny (hidden 256, 4x64 heads) or flash (V4-Flash: 4096, 64x512, indexer 64x128)")
    ap.add_argument("--state", default="prefill", choices=["prefill", "random"],
                    help="prefill: both prefill N tokens; random: kvslim's state is filled with random rows where N "
                         "tokens would leave it (no prefill timed) and transformers' cache is copied from it")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/native_v4.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = args.layers.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.state == "random" and args.storage != "float":
        sys.exit("error: --state random fills float rows; use --storage float")
    cfg, hf, ours = build(layers, args.topk, args.width)
    spec = spec_from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    indexer_time = time_indexers(ours)
    rows = []
    for n in contexts:
        x = torch.randn(1, n + args.decode_tokens + 1, cfg.hidden_size, generator=gen)
        row: dict = {"context": n}
        states = [m.new_state(args.storage) for m in ours]
        row["kvslim_prefill_s"] = row["kvslim_prefill_indexer_s"] = row["kvslim_prefill_rest_us_per_token"] = None
        if args.state == "random":
            fill_random_states(ours, states, n, gen)
        else:
            indexer_time["s"] = 0.0
            t0 = time.perf_counter()
            ours_step(ours, states, x[:, :n])
            row["kvslim_prefill_s"] = time.perf_counter() - t0
            row["kvslim_prefill_indexer_s"] = indexer_time["s"]
            row["kvslim_prefill_rest_us_per_token"] = 1e6 * (row["kvslim_prefill_s"] - indexer_time["s"]) / n
        row["kvslim_bytes_per_token"] = sum(s.nbytes() for s in states) / n
        row["expected_bytes_per_token"] = expected_bytes(cfg, layers, n, args.storage) / n
        # the planner prices fp32 rows; its fp8_ds_v4 layout assumes 64 RoPE dims (this stack has 16)
        row["planner_bytes_per_token"] = (expected_cache_bytes(spec, n, "fp32", layout="plan") / n
                                          if args.storage == "float" else None)
        hf_cache = None
        row["hf_prefill_s"] = None
        if n <= args.hf_prefill_max and args.state == "prefill":
            hf_cache = hf_v4_cache(cfg)
            t0 = time.perf_counter()
            hf_v4_step(hf, x[:, :n], hf_cache, 0)
            row["hf_prefill_s"] = time.perf_counter() - t0
            row["hf_cache"] = "own prefill"
        elif n <= args.hf_decode_max:
            hf_cache = hf_v4_cache_from_states(cfg, states)
            row["hf_cache"] = ("copied from kvslim state (prefill skipped: over --hf-prefill-max)"
                               if args.state == "prefill" else "copied from kvslim's random state")
        else:
            row["hf_cache"] = "skipped (over --hf-decode-max)"
        if hf_cache is not None:
            row["hf_bytes_per_token"] = cache_nbytes(hf_cache) / n
        outs_ours, outs_hf = [], []
        warm = 2
        for i in range(args.decode_tokens):
            if i == warm:
                t_ours = 0.0
                t_hf = 0.0
            tok = x[:, n + i : n + i + 1]
            t0 = time.perf_counter()
            outs_ours.append(ours_step(ours, states, tok))
            dt = time.perf_counter() - t0
            if i >= warm:
                t_ours += dt
            if hf_cache is not None:
                t0 = time.perf_counter()
                outs_hf.append(hf_v4_step(hf, tok, hf_cache, n + i))
                dt = time.perf_counter() - t0
                if i >= warm:
                    t_hf += dt
        timed = args.decode_tokens - warm
        row["kvslim_decode_ms"] = 1000 * t_ours / timed
        row["hf_decode_ms"] = 1000 * t_hf / timed if hf_cache is not None else None
        row["decode_speedup"] = row["hf_decode_ms"] / row["kvslim_decode_ms"] if hf_cache is not None else None
        row["prefill_speedup"] = (row["hf_prefill_s"] / row["kvslim_prefill_s"]) if row["hf_prefill_s"] else None
        row["decode_max_rel_diff"] = (max(rel(a, b) for a, b in zip(outs_ours, outs_hf, strict=True)) if outs_hf else None)
        # work of one more decode token each (both states advance by it, so they stay in step)
        tok = x[:, n + args.decode_tokens : n + args.decode_tokens + 1]
        row["kvslim_decode_mflop"] = decode_flops(ours_step, ours, states, tok) / 1e6
        row["hf_decode_mflop"] = (decode_flops(hf_v4_step, hf, tok, hf_cache, n + args.decode_tokens) / 1e6
                                  if hf_cache is not None else None)
        rows.append(row)
        print(f"  done N={n}", file=sys.stderr, flush=True)

    f = opt
    w = WIDTHS[args.width]
    print(f"layers={args.layers} width={args.width} (hidden={w['hidden_size']} heads={w['num_attention_heads']}x"
          f"{w['head_dim']} indexer={w['index_n_heads']}x{w['index_head_dim']}) window=128 m=4 m'=128 "
          f"topk={args.topk} storage={args.storage} state={args.state} threads={args.threads} "
          f"decode_tokens={args.decode_tokens}")
    print(f"{'N':>7} | {'kvslim dec ms':>13} {'hf dec ms':>10} {'x':>6} {'MFLOP':>7} {'hf MFLOP':>8} | "
          f"{'kvslim pre s':>12} {'hf pre s':>9} "
          f"{'x':>6} {'idx s':>7} {'rest us/t':>9} | {'B/tok':>7} {'planner':>7} {'hf B/tok':>8} | {'max rel':>8}  hf cache")
    for r in rows:
        print(f"{r['context']:>7} | {r['kvslim_decode_ms']:>13.2f} {f(r['hf_decode_ms'], '10.2f')} "
              f"{f(r['decode_speedup'], '6.1f')} {r['kvslim_decode_mflop']:>7.1f} {f(r['hf_decode_mflop'], '8.1f')} | "
              f"{f(r['kvslim_prefill_s'], '12.2f')} {f(r['hf_prefill_s'], '9.2f')} "
              f"{f(r['prefill_speedup'], '6.1f')} {f(r['kvslim_prefill_indexer_s'], '7.2f')} "
              f"{f(r['kvslim_prefill_rest_us_per_token'], '9.0f')} | {r['kvslim_bytes_per_token']:>7.1f} "
              f"{f(r['planner_bytes_per_token'], '7.1f')} {f(r.get('hf_bytes_per_token'), '8.1f')} | "
              f"{f(r['decode_max_rel_diff'], '8.1e')}  {r['hf_cache']}")
    result = {
        "bench": "native_v4", "layers": layers, "width": args.width, "shape": WIDTHS[args.width],
        "state": args.state, "topk": args.topk, "storage": args.storage, "threads": args.threads,
        "decode_tokens": args.decode_tokens, "torch": torch.__version__, "machine": platform.machine(),
        "rows": rows,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
