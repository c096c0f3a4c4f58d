"""One small offline vLLM run in its own process: ``python -m kvslim.vllm.run SPEC.json OUT.json``; and
``python -m kvslim.vllm.run --model-folder [smollm2-135m]``, which prints the safetensors folder of an embedded model
for vLLM to load (writing it first needs ``kvslim[hf]``: run it once with the main ``.venv``).

The tests and ``bench/vllm_capacity.py`` start every engine configuration in a fresh process (vLLM's engine core is
spawned, and the plugin's selection is process-wide), each with a fixed KV budget (``kv_cache_memory_bytes``).
SPEC keys: ``model`` (folder), ``format`` (kvslim format or null: stock vLLM), ``kv_cache_dtype`` (stock: "auto" or
"fp8"), ``dtype``, ``kv_bytes``, ``max_model_len``, ``max_num_batched_tokens``, ``max_num_seqs``, ``block_size``,
``prefix_caching``, ``batches`` (a list of lists of prompts: each inner list is one ``generate`` call, run in order, so
a later batch can hit the prefix cache of an earlier one), ``prompt_token_ids`` (alternative to ``batches``: one
batch of token-id prompts), ``max_tokens``, ``ignore_eos``, ``cold_bytes`` (a recall format's cold tier), ``stats``
(record vLLM's per-request timestamps and preemptions), ``inproc`` (default true: engine core and worker in this
process); ``cells`` (alternative to ``batches``: scored retrieval cells for ``kvslim niah --engine vllm``, see
:func:`run_cells`), with ``stop_token_ids`` and ``group``.
OUT: ``tokens`` (per batch, per prompt: generated token ids), ``text``, ``cached`` (prompt tokens served from
the prefix cache), ``kv_tokens`` and ``max_concurrency`` (what
vLLM computed for its pool), ``seconds`` per batch, ``started_s`` (engine start), ``recall`` (recall formats, in-process engines:
:func:`kvslim.vllm.recall.stats`, the tiers' bytes and what decode fetched).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_ENV = "KVSLIM_VLLM_MODEL"


def find_model_folder(name: str = "smollm2-135m") -> Path | None:
    """The safetensors folder kvslim wrote for embedded model ``name`` (``$KVSLIM_VLLM_MODEL`` wins), else None.

    kvslim's loader (``kvslim.models.load``, in an environment with ``kvslim[hf]``) dequantises the embedded GGUF
    once into ``$KVSLIM_CACHE/models/<gguf stem>-<key>/``; vLLM loads that folder. The newest one is returned."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    from kvslim.models import EMBEDDED_MODELS, resolve_model_name
    from kvslim.paths import cache_dir

    stem = Path(EMBEDDED_MODELS[resolve_model_name(name).name].gguf_name).stem
    found = [p.parent for p in (cache_dir() / "models").glob(f"{stem}-*/model.safetensors")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def make_model_folder(name: str = "smollm2-135m") -> Path:
    """Write (once) and return the safetensors folder of embedded model ``name``; needs ``kvslim[hf]``."""
    from kvslim.models import hf_folder

    return hf_folder(name)


def run(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if spec.get("inproc", True):  # engine core and worker in this process: two fewer vLLM imports (~25 s each)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.get("format"):
        os.environ["KVSLIM_VLLM_FORMAT"] = spec["format"]
    if spec.get("cold_bytes"):
        os.environ["KVSLIM_VLLM_COLD_BYTES"] = str(int(spec["cold_bytes"]))
    from vllm.inputs import TokensPrompt

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
        kv_cache_memory_bytes=int(spec.get("kv_bytes", 64 << 20)),
        max_model_len=int(spec.get("max_model_len", 4096)),
        max_num_batched_tokens=int(spec.get("max_num_batched_tokens", 256)),
        max_num_seqs=int(spec.get("max_num_seqs", 16)),
        block_size=spec.get("block_size"),
        enable_prefix_caching=bool(spec.get("prefix_caching", True)),
        enable_chunked_prefill=True,
        enforce_eager=True,
        seed=0,
        additional_config=spec.get("additional_config") or {},
        disable_log_stats=not spec.get("stats", False),
    )
    started = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=int(spec.get("max_tokens", 16)),
                        ignore_eos=bool(spec.get("ignore_eos", False)))
    cc = llm.llm_engine.vllm_config.cache_config
    out: dict = {"tokens": [], "text": [], "seconds": [], "started_s": started,
                 "kv_tokens": getattr(cc, "kv_cache_size_tokens", None),
                 "max_concurrency": getattr(cc, "kv_cache_max_concurrency", None)}
    out.update(pool_figures(llm))
    if spec.get("emit"):  # the engine's figures first, for a parent reading this process's output as it runs
        print(ENGINE_LINE + json.dumps({k: out.get(k) for k in ("kv_tokens", "max_concurrency", "block_size",
                                                               "kv_bytes_per_token", "kv_pool_bytes", "started_s")}),
              flush=True)
    if spec.get("cells") is not None:
        out["cells"] = run_cells(llm, spec, emit=spec.get("emit", False))
        return out
    batches = spec.get("batches") or []
    if spec.get("prompt_token_ids"):
        batches = [[TokensPrompt(prompt_token_ids=ids) for ids in spec["prompt_token_ids"]]]
    for batch in batches:
        t = time.perf_counter()
        res = llm.generate(batch, sp, use_tqdm=False)
        out["seconds"].append(time.perf_counter() - t)
        out["tokens"].append([list(r.outputs[0].token_ids) for r in res])
        out["text"].append([r.outputs[0].text for r in res])
        out.setdefault("cached", []).append([r.num_cached_tokens for r in res])
        if spec.get("stats"):  # per request: engine timestamps (monotonic s), preemptions
            out.setdefault("stats", []).append([
                {k: getattr(r.metrics, k, None) for k in ("scheduled_ts", "first_token_ts", "last_token_ts",
                                                          "num_generation_tokens", "num_preemptions")}
                for r in res])
    from kvslim.vllm import selected_format
    from kvslim.vllm.recall_spec import is_recall

    if is_recall(selected_format()) and spec.get("inproc", True):  # the tiers' bytes, counted by the backend
        from kvslim.vllm.recall import stats

        out["recall"] = stats()
    return out


def pool_figures(llm: Any) -> dict:
    """vLLM's own KV pool: ``block_size`` (tokens per block), ``kv_bytes_per_token`` (page bytes of every layer per
    token, from the KV cache config vLLM sized the pool with) and ``kv_pool_bytes`` (the pool tensors' bytes); empty
    where the engine core is not in this process."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    kcc = getattr(getattr(core, "scheduler", None), "kv_cache_config", None)
    if kcc is None:
        return {}
    block = llm.llm_engine.vllm_config.cache_config.block_size
    per_block = sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in kcc.kv_cache_groups)
    return {"block_size": int(block), "kv_bytes_per_token": per_block / block,
            "kv_pool_bytes": int(sum(t.size for t in kcc.kv_cache_tensors))}


def run_cells(llm: Any, spec: dict, emit: bool = False) -> list[dict]:
    """Scored cells: spec ``cells`` = ``[{"ids": prompt token ids, "answer_ids": expected answer token ids,
    "max_tokens": answer budget}]``, greedy, stopping at ``stop_token_ids``.

    Per group of ``group`` cells (default: as many as the pool holds at once, at most 8): one ``generate`` of the
    greedy answers, asking for the expected answer tokens' log-probabilities at every generated position
    (``logprob_token_ids``): while the greedy answer so far equals the expected tokens, position ``i`` is exactly
    the teacher-forced position of expected token ``i``. Then one ``generate`` of the rest: for each expected
    token ``i`` past the first divergence a one-token request of ``ids + answer_ids[:i]`` asking for
    ``answer_ids[i]``'s log-probability (its prompt is a prefix-cache hit of the greedy request's pages, so only
    the last partial block is recomputed). Their sum is the teacher-forced log-probability of the answer through the
    engine's KV, as the transformers harness computes it through a cache.
    Per cell: ``tokens`` (generated ids, a final stop token dropped), ``logprob``, ``seconds`` (its group's time
    shared out). ``emit``: also print each cell as a ``KVSLIM-CELL {json}`` line as its group finishes."""
    from vllm.inputs import TokensPrompt

    from vllm import SamplingParams

    cells = spec["cells"]
    stop = [int(t) for t in spec.get("stop_token_ids") or []]
    per_cell = max(len(c["ids"]) + len(c["answer_ids"]) + int(c["max_tokens"]) for c in cells) if cells else 1
    kv_tokens = getattr(llm.llm_engine.vllm_config.cache_config, "kv_cache_size_tokens", None) or per_cell
    group = int(spec.get("group") or max(1, min(8, kv_tokens // per_cell)))
    found: list[dict] = []
    tiers = _recall_counters()
    for g0 in range(0, len(cells), group):
        part = cells[g0:g0 + group]
        t = time.perf_counter()
        before = tiers() if tiers else None
        greedy = [SamplingParams(temperature=0.0, max_tokens=int(c["max_tokens"]), stop_token_ids=stop,
                                 logprob_token_ids=sorted(set(c["answer_ids"])) or None) for c in part]
        res = llm.generate([TokensPrompt(prompt_token_ids=list(c["ids"])) for c in part], greedy, use_tqdm=False)
        logprob = [0.0] * len(part)
        asks = []  # (cell, answer position) not on the greedy path: one request each
        for j, (c, r) in enumerate(zip(part, res, strict=True)):
            ans, got = list(c["answer_ids"]), list(r.outputs[0].token_ids)
            on_path = 0  # greedy position i is teacher-forced while the answer so far equals the expected tokens
            while on_path < min(len(ans), len(got)) and got[:on_path] == ans[:on_path]:
                logprob[j] += _logprob_of(r.outputs[0].logprobs, ans[on_path], on_path)
                on_path += 1
            asks += [(j, i) for i in range(on_path, len(ans))]
        forced = llm.generate(
            [TokensPrompt(prompt_token_ids=list(part[j]["ids"]) + list(part[j]["answer_ids"][:i])) for j, i in asks],
            [SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=[part[j]["answer_ids"][i]])
             for j, i in asks], use_tqdm=False) if asks else []
        seconds = (time.perf_counter() - t) / len(part)
        for (j, i), r in zip(asks, forced, strict=True):
            logprob[j] += _logprob_of(r.outputs[0].logprobs, part[j]["answer_ids"][i], 0)
        recall = _tier_delta(before, tiers()) if tiers else None
        for j, r in enumerate(res):
            toks = list(r.outputs[0].token_ids)
            if toks and toks[-1] in stop:
                toks = toks[:-1]
            cell = {"i": g0 + j, "tokens": toks, "logprob": logprob[j], "seconds": seconds,
                    "cached": r.num_cached_tokens}
            if recall is not None:
                cell["recall"] = recall
            found.append(cell)
            if emit:
                print(CELL_LINE + json.dumps(cell), flush=True)
    return found


def _recall_counters() -> Any:
    """:func:`kvslim.vllm.recall.counters` where a recall format is selected and its backend runs in this process
    (``inproc``), else None."""
    from kvslim.vllm import selected_format
    from kvslim.vllm.recall_spec import is_recall

    if not is_recall(selected_format()) or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        return None
    from kvslim.vllm.recall import counters

    return counters


def _tier_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What one group's requests did to the recall tiers (the group's decode tokens together; per request decode
    token, all layers): ``fetched_bytes_per_token`` (rows of the selected blocks), ``read_bytes_per_token`` (those +
    sinks + window), ``fetched_share`` (fetched rows over the context's rows), ``cold_bytes_per_token``."""
    d = {k: after[k] - before[k] for k in before}
    tokens = d["decode_calls"] / after["layers"] if after["layers"] else 0.0
    return {"decode_tokens": tokens,
            "fetched_bytes_per_token": d["fetched_bytes"] / tokens if tokens else 0.0,
            "read_bytes_per_token": (d["fetched_bytes"] + d["window_bytes"]) / tokens if tokens else 0.0,
            "fetched_share": d["fetched_rows"] / d["context_rows"] if d["context_rows"] else 0.0,
            "cold_bytes_per_token": after["cold_bytes_per_token"]}


CELL_LINE = "KVSLIM-CELL "
ENGINE_LINE = "KVSLIM-ENGINE "


def _logprob_of(logprobs: Any, token: int, pos: int) -> float:
    """The log-probability of ``token`` at generated position ``pos`` (asked for with ``logprob_token_ids``)."""
    if not logprobs or len(logprobs) <= pos or token not in logprobs[pos]:
        raise RuntimeError(f"vLLM returned no log-probability for token {token} (logprob_token_ids)")
    return float(logprobs[pos][token].logprob)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--model-folder":  # print (writing it first if needed) the folder
        name = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
        print(find_model_folder(name) or make_model_folder(name))
        return
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    # vLLM leaves its rendezvous file (tempdir/vllm_dist_<uuid>) behind: give it a private temp folder, removed after
    tmp = tempfile.mkdtemp(prefix="kvslim-vllm-run-")
    os.environ["TMPDIR"] = tmp
    tempfile.tempdir = tmp
    try:
        result = run(spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
