"""Whole tiny DeepSeek-V4 model: transformers 5.24 as is vs the same model with kvslim's attention
(``kvslim.nn.use_native_attention``): decode ms/token, prefill s, cache bytes/token, logits agreement.

One random-weight ``DeepseekV4ForCausalLM`` (the attention config of ``bench/native_v4.py``: hidden 256, 4 heads
of 64 with 16 RoPE dims, q_lora 128, 2 output groups of rank 64, window 128, layers SWA + CSA (m=4, indexer
16 heads x 16, top-k 512) + HCA (m'=128); plus vocab 1024, plain MoE layers of 8 routed experts (2 per token) of
width 128 and one shared expert, 4 hyper-connection streams; fp32, batch 1) is built once and deep-copied; one
copy gets kvslim's attention, the other stays stock (eager attention, its ``DynamicCache``). Both are timed in
the same process, one after the other.

Per context N: both prefill the same N random tokens (transformers only up to ``--hf-prefill-max``; beyond that
its prefill is skipped, said so, and its cache is copied from kvslim's states with ``hf_v4_cache_from_states``:
the hidden states entering each attention layer are the same in both models, so the copy is what transformers'
own prefill would hold, which the logits comparison checks), then both decode ``--decode-tokens`` tokens
(timed after 2 warm-up tokens), each step feeding both models kvslim's greedy token. Reported: the largest
relative difference of the two models' last-token logits over all steps (and the prefill's, where both ran),
and how many greedy tokens agree. "attn ms" is the part of each decode step spent inside the three attention
modules (kvslim / transformers; forward hooks), the rest being the embedding, hyper-connections, MoE, norms and head.

    python bench/native_v4_model.py                   # default: 2k, 8k
    python bench/native_v4_model.py --contexts 2048,8192,32768,131072 --out results/native_v4_model_full.json
    python bench/native_v4_model.py --dtype bfloat16 --out results/native_v4_model_bf16.json   # both models in bf16

Prints a table, then one JSON line; writes results/native_v4_model.json.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvslim.memory import cache_nbytes  # noqa: E402
from kvslim.nn import V4NativeCache, use_native_attention  # noqa: E402
from kvslim.nn.hf_reference import hf_v4_cache, hf_v4_cache_from_states, randomize_  # noqa: E402
from native_v4 import bench_config, opt, rel, write_result  # noqa: E402  (bench/ is on sys.path when run as a script)


def build_models(layers: list[str], topk: int, vocab: int, experts: int, expert_width: int, seed: int = 0):
    """(stock, patched): one random tiny ``DeepseekV4ForCausalLM`` and a deep copy with kvslim's attention."""
    from transformers import DeepseekV4ForCausalLM

    cfg = bench_config(layers, topk, vocab_size=vocab, n_routed_experts=experts, moe_intermediate_size=expert_width)
    stock = randomize_(DeepseekV4ForCausalLM(cfg), seed=seed).eval()
    return stock, use_native_attention(copy.deepcopy(stock))


class AttentionClock:
    """Seconds spent inside the attention modules of ``model`` (forward pre/post hooks on each ``self_attn``)."""

    def __init__(self, model) -> None:
        self.total = 0.0
        self._t0 = 0.0
        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(self._start)
            layer.self_attn.register_forward_hook(self._stop)

    def _start(self, *_) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        self.total += time.perf_counter() - self._t0


@torch.no_grad()
def timed(model, ids, **kw):
    t0 = time.perf_counter()
    logits = model(ids, logits_to_keep=1, **kw).logits[:, -1]
    return logits, time.perf_counter() - t0


def run_context(stock, ours, clocks, n: int, args, gen: torch.Generator) -> dict:
    cfg = stock.config
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen)
    row: dict = {"context": n}
    cache = V4NativeCache(ours, storage=args.storage)
    last_ours, row["kvslim_prefill_s"] = timed(ours, ids, cache=cache)
    row["kvslim_bytes_per_token"] = cache.nbytes() / n
    row["hf_prefill_s"] = None
    row["prefill_logits_rel_diff"] = None
    if n <= args.hf_prefill_max:
        hf_cache = hf_v4_cache(cfg)
        last_hf, row["hf_prefill_s"] = timed(stock, ids, cache=hf_cache, use_cache=True)
        row["prefill_logits_rel_diff"] = rel(last_ours, last_hf)
        row["hf_cache"] = "own prefill"
    else:
        hf_cache = hf_v4_cache_from_states(cfg, cache.states)
        row["hf_cache"] = "copied from kvslim states (prefill skipped: over --hf-prefill-max)"
    row["hf_bytes_per_token"] = cache_nbytes(hf_cache) / n
    warm = 2
    t_ours = t_hf = a_ours = a_hf = 0.0
    diffs, agree = [], 0
    tok = last_ours.argmax(-1, keepdim=True)
    for i in range(args.decode_tokens):
        before = [c.total for c in clocks]
        lo, dt_o = timed(ours, tok, cache=cache)
        lh, dt_h = timed(stock, tok, cache=hf_cache, use_cache=True)
        if i >= warm:
            t_ours += dt_o
            t_hf += dt_h
            a_ours += clocks[0].total - before[0]
            a_hf += clocks[1].total - before[1]
        diffs.append(rel(lo, lh))
        agree += int(lo.argmax(-1) == lh.argmax(-1))
        tok = lo.argmax(-1, keepdim=True)
    timed_steps = args.decode_tokens - warm
    row["kvslim_decode_ms"] = 1000 * t_ours / timed_steps
    row["hf_decode_ms"] = 1000 * t_hf / timed_steps
    row["decode_speedup"] = row["hf_decode_ms"] / row["kvslim_decode_ms"]
    row["kvslim_decode_attention_ms"] = 1000 * a_ours / timed_steps
    row["hf_decode_attention_ms"] = 1000 * a_hf / timed_steps
    row["prefill_speedup"] = row["hf_prefill_s"] / row["kvslim_prefill_s"] if row["hf_prefill_s"] else None
    row["decode_logits_max_rel_diff"] = max(diffs)
    row["greedy_agree"] = f"{agree}/{args.decode_tokens}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="2048,8192", help="comma-separated context lengths")
    ap.add_argument("--layers", default="swa,csa,hca", help="layer kinds, comma-separated (swa, csa, hca)")
    ap.add_argument("--topk", type=int, default=512, help="CSA indexer top-k (V4-Flash: 512)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer (2 active per token)")
    ap.add_argument("--expert-width", type=int, default=128, help="moe_intermediate_size")
    ap.add_argument("--decode-tokens", type=int, default=16, help="decode steps per context (2 warm-up, untimed)")
    ap.add_argument("--hf-prefill-max", type=int, default=8192,
                    help="largest context at which transformers' prefill is run (it grows quadratically)")
    ap.add_argument("--storage", default="float", choices=["float", "v4"],
                    help="kvslim row storage: float (fp32, equal to transformers) or v4 (FP8-ds rows, FP4 keys)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of both models (half precision only up to --hf-prefill-max: copied caches are fp32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/native_v4_model.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = args.layers.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.dtype != "float32" and max(contexts) > args.hf_prefill_max:
        sys.exit(f"error: --dtype {args.dtype} runs only contexts up to --hf-prefill-max ({args.hf_prefill_max}); "
                 "transformers' cache copied from kvslim's states is fp32")
    stock, ours = build_models(layers, args.topk, args.vocab, args.experts, args.expert_width)
    stock.to(getattr(torch, args.dtype))
    ours.to(getattr(torch, args.dtype))
    clocks = (AttentionClock(ours), AttentionClock(stock))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in contexts:
        rows.append(run_context(stock, ours, clocks, n, args, gen))
        print(f"  done N={n}", file=sys.stderr, flush=True)

    f = opt
    print(f"whole DeepseekV4ForCausalLM: layers={args.layers} hidden=256 heads=4x64 window=128 m=4 m'=128 "
          f"topk={args.topk} vocab={args.vocab} experts={args.experts}x{args.expert_width} hc_mult="
          f"{stock.config.hc_mult} dtype={args.dtype} storage={args.storage} threads={args.threads} decode_tokens={args.decode_tokens}")
    print(f"{'N':>7} | {'kvslim dec ms':>13} {'hf dec ms':>10} {'x':>5} {'attn ms':>11} | {'kvslim pre s':>12} "
          f"{'hf pre s':>9} {'x':>5} | {'B/tok':>7} {'hf B/tok':>8} | {'pre rel':>8} {'dec rel':>8} {'greedy':>6}"
          "  hf cache")
    for r in rows:
        attn = f"{r['kvslim_decode_attention_ms']:.1f}/{r['hf_decode_attention_ms']:.1f}"
        print(f"{r['context']:>7} | {r['kvslim_decode_ms']:>13.2f} {r['hf_decode_ms']:>10.2f} "
              f"{r['decode_speedup']:>5.1f} {attn:>11} | {r['kvslim_prefill_s']:>12.2f} {f(r['hf_prefill_s'], '9.2f')} "
              f"{f(r['prefill_speedup'], '5.1f')} | {r['kvslim_bytes_per_token']:>7.1f} "
              f"{r['hf_bytes_per_token']:>8.1f} | {f(r['prefill_logits_rel_diff'], '8.1e')} "
              f"{r['decode_logits_max_rel_diff']:>8.1e} {r['greedy_agree']:>6}  {r['hf_cache']}")
    result = {
        "bench": "native_v4_model", "layers": layers, "topk": args.topk, "vocab": args.vocab,
        "experts": args.experts, "expert_width": args.expert_width, "hc_mult": stock.config.hc_mult,
        "dtype": args.dtype, "storage": args.storage, "threads": args.threads, "decode_tokens": args.decode_tokens,
        "torch": torch.__version__, "machine": platform.machine(), "rows": rows,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
