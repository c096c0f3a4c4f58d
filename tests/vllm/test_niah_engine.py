"""``kvslim niah --engine vllm`` end to end: the harness in this (the main, ``kvslim[hf]``) environment, vLLM's engine
in .venv-vllm as its subprocess. Runs where the main .venv runs with .venv-vllm beside it (``make test``); skipped
in .venv-vllm itself (its transformers is too old for the harness) and where no vLLM environment is found."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from kvslim.eval.harness.vllm_engine import has_vllm  # noqa: E402

if has_vllm():
    pytest.skip("the harness side runs from the main .venv (kvslim[hf]); vLLM runs as its subprocess",
                allow_module_level=True)
pytest.importorskip("transformers")


def test_passkey_grid_through_vllm(tmp_path):
    from kvslim.cli import app
    from kvslim.errors import InvalidInput
    from kvslim.eval.harness.vllm_engine import find_vllm_python

    try:
        find_vllm_python()
    except InvalidInput as e:
        pytest.skip(str(e))
    out = tmp_path / "out"
    args = ["niah", "--engine", "vllm", "--model", "smollm2-135m", "--task", "passkey", "--recipes", "vllm;vllm:fp32",
            "--lengths", "600", "--depths", "0,1", "--vllm-kv-mib", "64", "--threads", "1", "--out", str(out), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["recipe"], r["depth"]) for r in recs) == [("vllm", 0.0), ("vllm", 1.0), ("vllm:fp32", 0.0),
                                                                ("vllm:fp32", 1.0)]
    by = {(r["recipe"], r["depth"]): r for r in recs}
    for d in (0.0, 1.0):
        stock, fp32 = by[("vllm", d)], by[("vllm:fp32", d)]
        assert stock["prompt_hash"] == fp32["prompt_hash"]
        assert fp32["answer_ids"] == stock["answer_ids"] and fp32["answer"] == stock["answer"]  # token-identical
        assert fp32["logprob"] == pytest.approx(stock["logprob"], abs=1e-3)
        for r in (stock, fp32):
            assert r["engine"] == "vllm" and r["format"] == "fp32" and r["answer_ids"]
            assert r["kv_bytes_per_token"] == 30 * 3 * 2 * 64 * 4  # SmolLM2: layers x KV heads x (K, V) x d x fp32
            assert r["kv_pool_tokens"] > 600 and r["kv_bytes"] >= 600 * r["kv_bytes_per_token"]
            assert r["success"] is (r["expected"][0] in r["answer"])
    # a rerun finds every cell done and starts no engine
    logs = {p.name: p.stat().st_mtime_ns for p in out.glob("vllm-*.log")}
    assert set(logs) == {"vllm-vllm.log", "vllm-vllm-fp32.log"}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and '"ran": 0' in again.output, again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("vllm-*.log")} == logs  # no engine started
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
