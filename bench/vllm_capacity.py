"""KV capacity (and, optionally, throughput at a fixed KV budget) on vLLM's own engine: stock fp32, stock bf16 and
vLLM's fp8 KV against kvslim's formats through the plugin (``kvslim.vllm``), side by side in one run.

Run it with the vLLM environment (``make vllm``)::

    .venv-vllm/bin/python bench/vllm_capacity.py                       # capacity only (a few minutes)
    .venv-vllm/bin/python bench/vllm_capacity.py --requests 16 --prompt 2048 --gen 256 --budget-mib 128
    .venv-vllm/bin/python bench/vllm_capacity.py --formats tq4,recall-fp8 --max-model-len 8192   # tiered recall

Capacity: every configuration starts an engine on SmolLM2-135M (float32 safetensors folder, see docs/vllm.md) with
the same fixed KV budget (``kv_cache_memory_bytes``, ``--capacity-mib``) and max_model_len 4096; the figures are
parsed from vLLM's own startup line ("CPU KV cache size: N tokens, Maximum concurrency for L tokens per request:
Cx"; max_model_len ``--max-model-len``), and tokens per GiB = N / budget. Rows: ``stock-fp32`` (model and KV float32), ``stock-bf16`` (``--dtype
bfloat16``: vLLM's KV in bf16), ``vllm-fp8`` (float32 model, ``--kv-cache-dtype fp8``), and ``kvslim-<fmt>`` (float32
model, KV in kvslim format ``fmt``; ``fmt@bfloat16``: the model in bf16). A ``recall`` format (``recall-fp8``,
``recall:...``) holds only block summaries in vLLM's pool and every row in a cold array of ``--cold-bytes`` (the
plugin's default 4 GiB), which caps the pool: its row reports the pool and cold bytes as allocated; ratios x stock
bf16 and x tq4 (when a tq4 row runs) are of the KV tokens (= of the maximum concurrency) at the same hot budget.

Throughput (``--requests N``): at the budget ``--budget-mib``, N requests of ``--prompt`` random-token prompts, each
generating ``--gen`` tokens (ignore_eos, greedy), submitted at once. Reported per row: vLLM's maximum concurrency for
``prompt + gen`` tokens per request (kv tokens / (prompt + gen)), the requests actually running at once (the most
[scheduled, last token] intervals of vLLM's per-request stats that overlap), preemptions, the end-to-end seconds
and generated tokens per second from the first request's first token to the last request's last token (decode
time, prefills of later requests interleaved in it), the engine process's CPU seconds (start-up included) and the
load average after the row. One engine thread per row (``OMP_NUM_THREADS=1``).
Prints a table and one JSON line; writes ``results/vllm_capacity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from kvslim.cache.recipe import split_recipe_list

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


STOCK = {"stock-fp32": {"dtype": "float32"}, "stock-bf16": {"dtype": "bfloat16"},
         "vllm-fp8": {"dtype": "float32", "kv_cache_dtype": "fp8"}}


def rows(formats: list[str], stock: bool | list[str] = True) -> list[tuple[str, dict]]:
    """Stock rows (all, none, or the names listed) then ``kvslim-<fmt>`` rows."""
    names = list(STOCK) if stock is True else (stock or [])
    out = [(n, STOCK[n]) for n in names]
    for f in formats:  # "tq4" (float32 model) or "tq4@bfloat16" (the model in bf16, KV in tq4)
        fmt, _, dtype = f.partition("@")
        out.append((f"kvslim-{f}", {"dtype": dtype or "float32", "format": fmt}))
    return out


def run(spec: dict, name: str, work: Path) -> tuple[dict, str]:
    """Run one engine configuration in a fresh process; the result gets ``cpu_s`` (the process's CPU seconds, start-up
    included: less moved than wall time by other jobs on a shared machine) and ``load`` (1-minute load average after)."""
    spec_file, out_file = work / f"{name}.json", work / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", TOKENIZERS_PARALLELISM="false")
    env.pop("KVSLIM_VLLM_FORMAT", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-m", "kvslim.vllm.run", str(spec_file), str(out_file)], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        if TOO_SMALL in r.stderr:  # vLLM refuses a pool that cannot hold one max_model_len request
            raise TooSmall(r.stderr[r.stderr.rindex(TOO_SMALL):].splitlines()[0])
        raise SystemExit(f"{name}: engine failed\n{r.stderr[-3000:]}")
    res = json.loads(out_file.read_text())
    res["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["load"] = os.getloadavg()[0]
    return res, r.stdout + r.stderr


TOO_SMALL = "To serve at least one request with the model's max seq len"


class TooSmall(Exception):
    """vLLM refused to start: the budget holds less than one request of max_model_len."""


def capacity(model: str, budget: int, formats: list[str], work: Path, max_len: int = 4096,
             cold_bytes: int | None = None) -> list[dict]:
    found = []
    for name, kw in rows(formats):
        if "recall" in kw.get("format", ""):  # one short request: the cold arrays are allocated at the first write
            kw = {**kw, "batches": [["The keeper"]], "max_tokens": 1, **({"cold_bytes": cold_bytes} if cold_bytes else {})}
        try:
            res, log = run({"model": model, "kv_bytes": budget, "max_model_len": max_len, **kw}, name, work)
        except TooSmall as exc:  # recorded as a row that holds no request of max_model_len (concurrency < 1)
            found.append({"row": name, "kv_tokens": None, "max_concurrency": None, "max_model_len": max_len,
                          "refused": str(exc)})
            print(f"  {name}: vLLM refused to start: {exc}", flush=True)
            continue
        m = LINE.search(log)
        if m is None:
            raise SystemExit(f"{name}: no 'KV cache size' line in vLLM's log")
        tokens = int(m.group(1).replace(",", ""))
        row = {"row": name, "kv_tokens": tokens, "tokens_per_gib": tokens / (budget / (1 << 30)),
               "max_concurrency": float(m.group(3)), "max_model_len": max_len, "startup_s": round(res["started_s"], 1)}
        if "recall" in res:  # a recall format: the hot pool (vLLM's pages) and the cold array, as allocated
            row.update(pool_bytes=res["recall"]["pool_bytes"], cold_bytes=res["recall"]["cold_bytes"])
        found.append(row)
        print(f"  {name}: {m.group(0)}", flush=True)
    base = {r["row"]: r["kv_tokens"] for r in found}
    for r in found:
        for key, row in (("x_fp32", "stock-fp32"), ("x_vllm_fp8", "vllm-fp8"), ("x_stock_bf16", "stock-bf16"),
                         ("x_tq4", "kvslim-tq4")):
            r[key] = r["kv_tokens"] / base[row] if r["kv_tokens"] and base.get(row) else None
    return found


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def running_at_once(stats: list[dict]) -> int:
    events = []
    for s in stats:
        if s.get("scheduled_ts") and s.get("last_token_ts"):
            events += [(s["scheduled_ts"], 1), (s["last_token_ts"], -1)]
    best = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


def throughput(model: str, budget: int, formats: list[str], n: int, prompt: int, gen: int, work: Path,
               stock: bool | list[str] = True, cold_bytes: int | None = None) -> list[dict]:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(prompt)] for _ in range(n)]
    found = []
    for name, kw in rows(formats, stock):
        if cold_bytes and "recall" in kw.get("format", ""):
            kw = {**kw, "cold_bytes": cold_bytes}
        spec = {"model": model, "kv_bytes": budget, "max_model_len": prompt + gen, "max_num_seqs": n,
                "max_num_batched_tokens": 512, "prompt_token_ids": prompts, "max_tokens": gen, "ignore_eos": True,
                "prefix_caching": False, "stats": True, **kw}
        try:
            res, log = run(spec, f"tp-{name}", work)
        except TooSmall as exc:
            found.append({"row": name, "kv_tokens": None, "refused": str(exc)})
            print(f"  {name}: vLLM refused to start: {exc}", flush=True)
            continue
        st = res["stats"][0]
        firsts = [s["first_token_ts"] for s in st if s.get("first_token_ts")]
        lasts = [s["last_token_ts"] for s in st if s.get("last_token_ts")]
        generated = sum(len(t) for t in res["tokens"][0])
        span = max(lasts) - min(firsts)
        row = {"row": name, "kv_tokens": res["kv_tokens"], "max_concurrency": res["kv_tokens"] / (prompt + gen),
               "running_at_once": running_at_once(st), "preemptions": sum(s.get("num_preemptions") or 0 for s in st),
               "e2e_s": res["seconds"][0], "gen_tok_s": (generated - len(st)) / span if span > 0 else None,
               "cpu_s": res["cpu_s"], "load": res["load"]}
        if "recall" in res:  # bytes fetched from the cold tier per decode token (all layers), and their share
            rc = res["recall"]
            row.update(pool_bytes=rc["pool_bytes"], cold_bytes=rc["cold_bytes"],
                       fetched_bytes_per_token=rc["fetched_bytes_per_token"], fetched_share=rc["fetched_share"],
                       window_bytes_per_token=rc["window_bytes_per_token"], read_share=rc["read_share"])
        found.append(row)
        print(f"  {name}: {json.dumps(row)}", flush=True)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="safetensors folder (default: kvslim's SmolLM2-135M folder)")
    ap.add_argument("--formats", default="bf16,fp8,int8,tq4,tq3.5,tq3,tq2.5", help="kvslim formats, comma-separated (a recipe's own key=value commas stay in it)")
    ap.add_argument("--capacity-mib", type=int, default=256, help="KV budget of the capacity rows (MiB)")
    ap.add_argument("--max-model-len", type=int, default=4096, help="max_model_len of the capacity rows")
    ap.add_argument("--cold-bytes", type=int, default=None,
                    help="recall formats: the cold tier's bytes (default: the plugin's, 4 GiB)")
    ap.add_argument("--requests", type=int, default=0, help="throughput rows: requests submitted at once (0: skip)")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--budget-mib", type=int, default=128, help="KV budget of the throughput rows (MiB)")
    ap.add_argument("--throughput-formats", default="tq4,tq3", help="kvslim formats of the throughput rows")
    ap.add_argument("--no-capacity", action="store_true", help="only the throughput rows")
    ap.add_argument("--no-stock", action="store_true", help="throughput rows of the kvslim formats only")
    ap.add_argument("--stock-rows", default=",".join(STOCK), help="stock rows of the throughput run, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "results" / "vllm_capacity.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from kvslim.vllm.run import find_model_folder

    model = a.model or str(find_model_folder() or "")
    if not model:
        raise SystemExit("no SmolLM2 folder: run `.venv/bin/kvslim models --hf-folder smollm2-135m` once")
    formats = [f for f in split_recipe_list(a.formats) if f]  # "recall:k=12,pin=4,cold=fp8+fp8" stays one item
    result: dict = {"model": model, "capacity_budget_bytes": a.capacity_mib << 20}
    with tempfile.TemporaryDirectory(prefix="kvslim-vllm-bench-") as tmp:
        if not a.no_capacity:
            print(f"capacity at {a.capacity_mib} MiB of KV, max_model_len {a.max_model_len}:", flush=True)
            cap = capacity(model, a.capacity_mib << 20, formats, Path(tmp), a.max_model_len, a.cold_bytes)
            result["capacity"] = cap
            tq4 = any(r["row"] == "kvslim-tq4" for r in cap)
            print(f"\n| row | KV tokens | tokens per GiB | x stock fp32 | x stock bf16 | x vLLM fp8 |{' x tq4 |' * tq4} "
                  f"max concurrency @{a.max_model_len} | cold tier |")
            print("|---|---:|---:|---:|---:|---:|" + "---:|" * tq4 + "---:|---:|")
            for r in cap:
                cold = f"{r['cold_bytes'] / (1 << 30):.2f} GiB" if r.get("cold_bytes") else "-"
                x_tq4 = f" {_x(r['x_tq4'])} |" if tq4 else ""
                if r["kv_tokens"] is None:
                    print(f"| {r['row']} | refused: < 1 request of {a.max_model_len} | | - | - | - |{x_tq4} < 1 | - |")
                    continue
                print(f"| {r['row']} | {r['kv_tokens']:,} | {r['tokens_per_gib']:,.0f} | {_x(r['x_fp32'])} | "
                      f"{_x(r['x_stock_bf16'])} | {_x(r['x_vllm_fp8'])} |{x_tq4} {r['max_concurrency']:.2f} | {cold} |")
        if a.requests:
            tf = [f for f in split_recipe_list(a.throughput_formats) if f]
            print(f"\nthroughput at {a.budget_mib} MiB: {a.requests} requests x {a.prompt} prompt + {a.gen} "
                  "generated tokens:", flush=True)
            stock_rows = [] if a.no_stock else [r.strip() for r in a.stock_rows.split(",") if r.strip()]
            unknown = sorted(set(stock_rows) - set(STOCK))
            if unknown:
                raise SystemExit(f"--stock-rows: unknown {unknown}; choose from {', '.join(STOCK)}")
            tp = throughput(model, a.budget_mib << 20, tf, a.requests, a.prompt, a.gen, Path(tmp), stock_rows,
                            a.cold_bytes)
            result["throughput"] = {"budget_bytes": a.budget_mib << 20, "requests": a.requests,
                                    "prompt": a.prompt, "gen": a.gen, "rows": tp}
            print("\n| row | KV tokens | max concurrency | running at once | preemptions | end-to-end s | "
                  "generated tok/s | engine CPU s | load after |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in tp:
                if r["kv_tokens"] is None:
                    print(f"| {r['row']} | refused: < 1 request | | | | | |")
                    continue
                g = f"{r['gen_tok_s']:.1f}" if r["gen_tok_s"] else "-"
                print(f"| {r['row']} | {r['kv_tokens']:,} | {r['max_concurrency']:.2f} | {r['running_at_once']} | "
                      f"{r['preemptions']} | {r['e2e_s']:.1f} | {g} | {r['cpu_s']:.0f} | {r['load']:.1f} |")
            for r in tp:
                if "fetched_share" in r:
                    print(f"  {r['row']}: per decode token (all layers) {r['fetched_bytes_per_token']:,.0f} B fetched "
                          f"from the cold tier ({r['fetched_share']:.1%} of the context's rows), sinks + window "
                          f"{r['window_bytes_per_token']:,.0f} B (read from the cold array on CPU; all read: "
                          f"{r['read_share']:.1%}); pool {r['pool_bytes']:,} B, cold {r['cold_bytes']:,} B")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
