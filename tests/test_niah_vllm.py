"""``kvslim niah --engine vllm`` without vLLM: recipe parsing and refusals, the vLLM python lookup, records built
from the engine's per-cell output (a fake engine process speaking :mod:`kvslim.vllm.run`'s line protocol), resume,
and a failing engine. The real engine end to end: tests/vllm/test_niah_engine.py."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvslim.cli import app
from kvslim.cli.cmd_niah import check_vllm_format
from kvslim.errors import InvalidInput
from kvslim.eval.harness.runner import Grid
from kvslim.eval.harness.tiny import tiny_pair
from kvslim.eval.harness.vllm_engine import (
    EngineFailed,
    find_vllm_python,
    parse_vllm_recipes,
    run_vllm_grid,
)

runner = CliRunner()


def _fmt(f):
    return check_vllm_format(f, 64)


def test_recipes_parse_to_engine_rows():
    rows = parse_vllm_recipes(["vllm", "vllm:stock", " vllm:tq4 ", "vllm:stock-fp8", "vllm:stock-bf16", "vllm:fp32",
                               "vllm:tq4"], _fmt)
    assert [r.name for r in rows] == ["vllm", "vllm:tq4", "vllm:stock-fp8", "vllm:stock-bf16", "vllm:fp32"]
    by = {r.name: r for r in rows}
    assert by["vllm"].engine_spec() == {"format": None, "dtype": "float32", "kv_cache_dtype": "auto"}
    assert by["vllm:stock-fp8"].engine_spec() == {"format": None, "dtype": "float32", "kv_cache_dtype": "fp8"}
    assert by["vllm:stock-bf16"].engine_spec() == {"format": None, "dtype": "bfloat16", "kv_cache_dtype": "auto"}
    assert by["vllm:tq4"].engine_spec() == {"format": "tq4", "dtype": "float32", "kv_cache_dtype": "auto"}
    assert [by[n].kv_format for n in ("vllm", "vllm:stock-fp8", "vllm:stock-bf16", "vllm:fp32", "vllm:tq4")] == [
        "fp32", "fp8-vllm", "bf16", "fp32", "tq4"]


@pytest.mark.parametrize("names, needle", [
    (["full"], "'full' is a transformers recipe"),
    (["vllm", "v4+tq3"], "'v4+tq3' is a transformers recipe"),
    (["vllm:kivi2"], "'kivi2'"),
    (["vllm:kivi4"], "rows are not independent per token"),
    (["vllm:nope"], "unknown kvslim format 'nope'"),
    (["vllm:stock-fp4"], "unknown stock vLLM row"),
    (["vllm:tq4,k=3"], "vllm:FORMAT"),
    (["vllm:"], "vllm:FORMAT"),
    ([" "], "empty recipe name"),
    ([], "the grid is empty"),
])
def test_bad_recipes_are_refused(names, needle):
    with pytest.raises(InvalidInput, match=None) as e:
        parse_vllm_recipes(names, _fmt)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_format_checked_against_head_size():
    check_vllm_format("tq2.5", 64)
    with pytest.raises(InvalidInput, match="tq2.5.*head size 62"):
        check_vllm_format("tq2.5", 62)


@pytest.mark.parametrize("args, needle", [
    (["--engine", "vllm", "--recipes", "full"], "transformers recipe"),
    (["--recipes", "vllm:tq4"], "add --engine vllm"),
    (["--recipe", "vllm"], "add --engine vllm"),
    (["--engine", "vllm", "--batch", "2"], "--batch is not available with --engine vllm"),
    (["--engine", "vllm", "--ray", "local"], "--ray is not available"),
    (["--engine", "vllm", "--prefill-chunk", "64"], "--prefill-chunk is not available"),
    (["--engine", "vllm", "--suite", "ruler"], "--suite is not available"),
    (["--engine", "vllm", "--recipes", "vllm:kivi2"], "kivi2"),
    (["--engine", "vllm", "--task", "fidelity"], "fidelity needs its own model calls"),
    (["--engine", "vllm", "--opt", "agnostic=true"], "agnostic"),
    (["--engine", "sglang"], "choose transformers or vllm"),
    (["--vllm-kv-mib", "64"], "--vllm-kv-mib applies to --engine vllm only"),
    (["--vllm-python", "/x"], "--vllm-python applies to --engine vllm only"),
    (["--engine", "vllm", "--vllm-python", "/no/such/python"], "no such executable Python"),
    (["--engine", "vllm", "--vllm-kv-mib", "4"], "--vllm-kv-mib"),
])
def test_cli_refusals_are_one_line_before_anything_runs(tmp_path, args, needle):
    out = tmp_path / "out"
    res = runner.invoke(app, ["niah", "--model", "tiny-llama", "--lengths", "300", "--out", str(out), *args],
                        env={"KVSLIM_VLLM_PYTHON": sys.executable})
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output
    assert not out.exists()


def test_vllm_python_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv("KVSLIM_VLLM_PYTHON", raising=False)
    exe = tmp_path / "py"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    assert find_vllm_python(str(exe), repo=tmp_path) == str(exe)
    monkeypatch.setenv("KVSLIM_VLLM_PYTHON", str(exe))
    assert find_vllm_python(None, repo=tmp_path) == str(exe)
    monkeypatch.setenv("KVSLIM_VLLM_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="KVSLIM_VLLM_PYTHON .*missing: no such executable"):
        find_vllm_python(None, repo=tmp_path)
    monkeypatch.delenv("KVSLIM_VLLM_PYTHON")
    beside = tmp_path / ".venv-vllm" / "bin" / "python"
    beside.parent.mkdir(parents=True)
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    assert find_vllm_python(None, repo=tmp_path) == str(beside)
    from kvslim.eval.harness import vllm_engine

    monkeypatch.setattr(vllm_engine, "has_vllm", lambda: False)
    with pytest.raises(InvalidInput, match="run `make vllm`"):
        find_vllm_python(None, repo=tmp_path / "elsewhere")


# A stand-in for `<vllm python> -m kvslim.vllm.run SPEC OUT`: speaks its output protocol. Cell i answers with the
# expected answer tokens + a stop token when i is even, else with other tokens; FAKE_FAIL_AFTER=n fails after n cells.
FAKE = r'''#!{python}
import json, os, sys
assert sys.argv[1:3] == ["-m", "kvslim.vllm.run"], sys.argv
spec = json.load(open(sys.argv[3]))
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"format": spec["format"], "dtype": spec["dtype"], "kv": spec["kv_cache_dtype"],
                        "n": len(spec["cells"]), "omp": os.environ.get("OMP_NUM_THREADS"),
                        "sel": os.environ.get("KVSLIM_VLLM_FORMAT")}}) + "\n")
print("INFO some vLLM log line", flush=True)
print("KVSLIM-ENGINE " + json.dumps({{"kv_tokens": 1000, "block_size": 16, "kv_bytes_per_token": 34.5 * 2 * 2,
                                     "max_concurrency": 3.0}}), flush=True)
fail = int(os.environ.get("FAKE_FAIL_AFTER", "-1"))
stop = spec["stop_token_ids"]
for i, c in enumerate(spec["cells"]):
    if i == fail:
        print("Traceback (most recent call last):\nValueError: boom in the engine", flush=True)
        sys.exit(1)
    toks = c["answer_ids"] + stop[:1] if i % 2 == 0 else [c["answer_ids"][0] + 1] * 3
    cell = {{"i": i, "tokens": toks, "logprob": -0.25 * (i + 1), "seconds": 0.5}}
    if (spec["format"] or "").startswith("recall"):  # run_cells' tier figures of a recall format
        cell["recall"] = {{"decode_tokens": 4.0, "fetched_bytes_per_token": 1000.0, "read_bytes_per_token": 3000.0,
                          "fetched_share": 0.05, "cold_bytes_per_token": 12240.0}}
    print("KVSLIM-CELL " + json.dumps(cell), flush=True)
'''


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    exe = tmp_path / "fake-vllm-python"
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "engine-calls.jsonl"))
    monkeypatch.setenv("KVSLIM_VLLM_FORMAT", "tq3")  # a stray selection must not reach the engine
    return exe


def _grid(recipes):
    return Grid("passkey", "tiny-llama", recipes, [500, 600], [0.0, 1.0], [0])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_records_from_engine_output_and_resume(tmp_path, fake_engine):
    pair = tiny_pair("tiny-llama")
    out = tmp_path / "out"
    kw = dict(check_format=check_vllm_format, python=str(fake_engine), progress=False, pair=pair,
              model_folder=tmp_path, threads=3)
    res = run_vllm_grid(_grid(["vllm", "vllm:tq4"]), out, **kw)
    assert res == {"ran": 8, "skipped": 0, "total": 8, "out": str(out / "results.jsonl")}
    calls = [json.loads(x) for x in (tmp_path / "engine-calls.jsonl").read_text().splitlines()]
    assert calls == [  # one engine per recipe, all its cells; the spec's format only; --threads as OMP threads
        {"format": None, "dtype": "float32", "kv": "auto", "n": 4, "omp": "3", "sel": None},
        {"format": "tq4", "dtype": "float32", "kv": "auto", "n": 4, "omp": "3", "sel": None}]
    recs = _records(out)
    assert [(r["recipe"], r["length"], r["depth"]) for r in recs] == [
        (rc, n, d) for rc in ("vllm", "vllm:tq4") for n in (500, 600) for d in (0.0, 1.0)]
    tok = pair[1]
    for i, r in enumerate(recs):
        j = i % 4  # the cell's index in its engine's spec
        assert r["engine"] == "vllm" and r["format"] == ("fp32" if r["recipe"] == "vllm" else "tq4")
        assert r["success"] is (j % 2 == 0)
        assert r["score"] == r["logprob"] == -0.25 * (j + 1)
        key = tok.decode(r["answer_ids"], skip_special_tokens=True).strip()
        assert (key == r["expected"][0]) is r["success"] and r["answer"] == key
        assert stopped_before(r["answer_ids"], pair)  # the stop token is not part of the answer
        assert r["kv_pool_tokens"] == 1000 and r["block_size"] == 16 and r["kv_bytes_per_token"] == 138.0
        assert r["kv_bytes"] == -(-r["prompt_tokens"] // 16) * 16 * 138  # whole blocks of the pool
        assert r["prompt_tokens"] == r["length"] and r["seconds"] == 0.5
    # the same prompts as the transformers path: its records' hashes for the same grid
    from kvslim.eval.harness.runner import run_grid

    run_grid(Grid("passkey", "tiny-llama", ["full"], [500, 600], [0.0, 1.0], [0]), tmp_path / "tf", pair=pair,
             progress=False)
    assert {r["prompt_hash"] for r in _records(tmp_path / "tf")} == {r["prompt_hash"] for r in recs}
    # rerun: every cell done, no engine started; more recipes run only the new ones
    assert run_vllm_grid(_grid(["vllm:stock", "vllm:tq4"]), out, **kw)["ran"] == 0
    assert len((tmp_path / "engine-calls.jsonl").read_text().splitlines()) == 2
    assert run_vllm_grid(_grid(["vllm", "vllm:stock-fp8"]), out, **kw)["ran"] == 4
    assert json.loads((tmp_path / "engine-calls.jsonl").read_text().splitlines()[-1])["kv"] == "fp8"
    # the report reads them as any recipe, and --compare pairs them
    rep = runner.invoke(app, ["report", str(out), "--no-images", "--compare", "vllm:tq4", "vllm", "--json"])
    assert rep.exit_code == 0, rep.output
    got = json.loads(rep.output)
    assert {row["recipe"] for row in got["summaries"][0]["rows"]} == {"vllm", "vllm:tq4", "vllm:stock-fp8"}
    assert got["compare"][0]["n"] == 4


def stopped_before(ids, pair):
    from kvslim.eval.harness.engine import eos_ids

    return not (set(ids) & eos_ids(pair[1], pair[0]))


def test_engine_failure_keeps_finished_cells(tmp_path, fake_engine, monkeypatch):
    pair = tiny_pair("tiny-llama")
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_FAIL_AFTER", "3")
    kw = dict(check_format=check_vllm_format, python=str(fake_engine), progress=False, pair=pair,
              model_folder=tmp_path)
    with pytest.raises(EngineFailed) as e:
        run_vllm_grid(_grid(["vllm:tq4"]), out, **kw)
    msg = str(e.value)
    assert "vllm:tq4" in msg and "ValueError: boom in the engine" in msg and "\n" not in msg
    assert "vllm-vllm-tq4.log" in msg and "some vLLM log line" in (out / "vllm-vllm-tq4.log").read_text()
    assert len(_records(out)) == 3
    monkeypatch.delenv("FAKE_FAIL_AFTER")
    res = run_vllm_grid(_grid(["vllm:tq4"]), out, **kw)
    assert (res["ran"], res["skipped"]) == (1, 3)
    last = json.loads((tmp_path / "engine-calls.jsonl").read_text().splitlines()[-1])
    assert last["n"] == 1  # only the unfinished cell went to the engine
    assert len(_records(out)) == 4


def test_run_cells_protocol_matches_harness():
    """The line prefixes the harness reads are the ones kvslim.vllm.run prints."""
    from kvslim.eval.harness import vllm_engine
    from kvslim.vllm import run

    assert run.CELL_LINE == vllm_engine.CELL_LINE and run.ENGINE_LINE == vllm_engine.ENGINE_LINE
    assert os.path.basename(run.__file__) == "run.py"


def test_recall_rows_parse_and_are_checked():
    rows = parse_vllm_recipes(["vllm:recall-fp8", "vllm:recall:k=0", "vllm:recall:k=8,cold=fp8+fp8",
                               "vllm:recall:k=12,pin=4"], _fmt)
    assert [r.format for r in rows] == ["recall-fp8", "recall:k=0", "recall:k=8,cold=fp8+fp8", "recall:k=12,pin=4"]
    with pytest.raises(InvalidInput, match="does not support prefill=select") as e:  # not in the plugin
        parse_vllm_recipes(["vllm:recall:k=12,prefill=select"], _fmt)
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidInput, match="tq2.5.*head size 62"):  # the summaries' codec at the head size
        check_vllm_format("recall:k=8+tq2.5", 62)


def test_recall_records_carry_the_cold_tier(tmp_path, fake_engine):
    pair = tiny_pair("tiny-llama")
    out = tmp_path / "out"
    run_vllm_grid(_grid(["vllm:recall-fp8"]), out, check_format=check_vllm_format, python=str(fake_engine),
                  progress=False, pair=pair, model_folder=tmp_path)
    recs = _records(out)
    assert len(recs) == 4
    for r in recs:
        assert r["format"] == "recall-fp8"
        assert r["kv_bytes"] == -(-r["prompt_tokens"] // 16) * 16 * 138  # vLLM's pages: the summaries
        assert r["cold_bytes"] == -(-r["prompt_tokens"] // 16) * 16 * 12240  # the cold array's rows of the prompt
        assert r["recall"]["fetched_share"] == 0.05 and r["recall"]["fetched_bytes_per_token"] == 1000.0


def test_tier_delta_is_per_decode_token_of_one_group():
    from kvslim.vllm.run import _tier_delta

    before = {"decode_calls": 60.0, "context_rows": 1000.0, "fetched_rows": 50.0, "window_rows": 100.0,
              "fetched_bytes": 5000.0, "window_bytes": 10000.0, "layers": 30.0, "cold_bytes_per_token": 7.0}
    after = dict(before, decode_calls=120.0, context_rows=3000.0, fetched_rows=150.0, window_rows=300.0,
                 fetched_bytes=15000.0, window_bytes=30000.0)
    d = _tier_delta(before, after)  # 60 layer calls over 30 layers: 2 decode tokens
    assert d == {"decode_tokens": 2.0, "fetched_bytes_per_token": 5000.0, "read_bytes_per_token": 15000.0,
                 "fetched_share": 0.05, "cold_bytes_per_token": 7.0}
