"""The tiered ``recall`` format inside vLLM's engine (SmolLM2-135M, float32 folder, vLLM's CPU build), each
configuration in its own process (:mod:`kvslim.vllm.run`): lossless ``k=0`` against stock vLLM with chunked prefill
and a reused prefix; a selecting recipe with prefix-cache hits against one-shot prefills without a cache; a pool
capped by ``cold_bytes`` that forces preemption against an uncapped one; refusals at startup."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM is not installed here: `make vllm` builds .venv-vllm")

from _engine_helpers import BATCHES, PREFIX, engine_env, run_engine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE = {"kv_bytes": 64 << 20, "max_model_len": 1024, "max_num_batched_tokens": 64, "max_num_seqs": 8,
        "max_tokens": 16, "ignore_eos": True, "batches": BATCHES}
COLD_BLOCK_16 = 30 * 3 * 16 * 2 * 4 * 64  # cold bytes per 16-token block: 30 layers x 3 KV heads x fp32 [K|V] rows


def _spec(folder: str, **kw) -> dict:
    return {**BASE, "model": folder, **kw}


def test_recall_k0_is_token_identical_to_stock_vllm(smol_folder, tmp_path):
    """Every row attended (k=0): the stock tokens, with chunked prefill (64-token steps) and the second batch's
    prompts served partly from the prefix cache; the log names what each tier holds."""
    stock = run_engine(_spec(smol_folder), tmp_path, "stock")
    ours = run_engine(_spec(smol_folder, format="recall:k=0"), tmp_path, "recall-k0")
    assert ours["tokens"] == stock["tokens"]
    assert min(ours["cached"][1][:2]) >= 128 and min(stock["cached"][1][:2]) >= 128
    assert "vLLM's pages hold block summaries" in ours["log"] and "cold array" in ours["log"]
    r = ours["recall"]
    assert r["layers"] == 30 and r["read_share"] == 1.0 and r["decode_tokens"] == 4 * 15
    # the pool holds summaries only: fp32 bbox at m=32 is 2 x 256 B per block -> 16 B per token and KV head; the
    # cold array one fp32 [K|V] cell (512 B) per slot of the pool: 32 x the pool
    page = 30 * 3 * 32 * 16
    assert r["pool_bytes"] % page == 0 and ours["kv_tokens"] <= r["pool_bytes"] // page * 32
    assert r["pool_bytes"] <= 64 << 20 and r["cold_bytes"] == 32 * r["pool_bytes"]


def test_selecting_recall_with_prefix_hits_matches_one_shot_prefills(smol_folder, tmp_path):
    """k=4 blocks of 16 per KV head out of ~12 (window 32, 4 sinks), one pinned with the block after it: requests
    that share a cached prefix each read their own rows of it (its blocks' cold rows, written once) and their own
    pins (stamped by their own last prompt row, in their own tail blocks) and give the tokens of one-shot prefills
    without any cache, one prompt at a time."""
    fmt = "recall:m=16,k=4,w=32,pin=1,span=2"
    shared = run_engine(_spec(smol_folder, format=fmt), tmp_path, "shared")
    alone = run_engine(_spec(smol_folder, format=fmt, max_num_batched_tokens=1024, prefix_caching=False,
                             batches=[[p] for b in BATCHES for p in b]), tmp_path, "alone")
    assert [t for b in shared["tokens"] for t in b] == [b[0] for b in alone["tokens"]]
    assert min(shared["cached"][1][:2]) >= 160
    assert 0 < shared["recall"]["fetched_share"] < 0.5  # blocks were selected, not everything read
    assert shared["recall"]["pin_stamps"] > 0 and shared["recall"]["pinned_decodes"] > 0


def test_preempted_requests_resume_to_the_same_tokens(smol_folder, tmp_path):
    """cold_bytes of 40 blocks caps vLLM's pool (4 requests sharing a 13-block prefix grow to ~57): vLLM preempts and recomputes; the resumed
    requests' tokens equal those of an engine with room for all of them (k=0: every row attended; see docs/vllm.md
    for a selecting recipe)."""
    prompts = [PREFIX + f"Entry {i}: the keeper saw" for i in range(4)]
    kw = {"format": "recall:m=16,k=0,w=32", "batches": [prompts], "max_tokens": 160, "max_model_len": 512,
          "stats": True}
    capped = run_engine(_spec(smol_folder, cold_bytes=40 * COLD_BLOCK_16, **kw), tmp_path, "capped")
    roomy = run_engine(_spec(smol_folder, **kw), tmp_path, "roomy")
    assert capped["kv_tokens"] <= 40 * 16 < roomy["kv_tokens"]
    assert sum(s["num_preemptions"] or 0 for s in capped["stats"][0]) > 0
    assert sum(s["num_preemptions"] or 0 for s in roomy["stats"][0]) == 0
    assert capped["tokens"] == roomy["tokens"]
    assert capped["recall"]["cold_bytes"] <= 40 * COLD_BLOCK_16


def _startup_error(folder: str, additional_config: dict) -> str:
    code = (
        "from vllm import LLM\n"
        f"LLM(model={folder!r}, dtype='float32', max_model_len=4096, kv_cache_memory_bytes=64 << 20, "
        f"enforce_eager=True, additional_config={additional_config!r})\n"
    )
    env = engine_env()
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, "the engine started with a bad kvslim selection"
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("config, words", [
    ({"format": "recall:k=8,prefill=select"}, ["SelectionError", "prefill=select"]),
    ({"format": "recall-fp8", "cold_bytes": 1 << 20}, ["SelectionError", "cold_bytes=1048576", "4096-token"]),
    ({"format": "tq4", "cold_bytes": 1 << 30}, ["SelectionError", "cold_bytes", "'tq4'"]),
])
def test_bad_recall_selection_fails_at_startup_with_one_line(smol_folder, config, words):
    last = _startup_error(smol_folder, {"kvslim": config})
    for w in words:
        assert w in last, last
