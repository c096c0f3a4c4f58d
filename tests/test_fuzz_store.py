"""Issue 15, fuzzing beyond the listed cases: damaged results.jsonl lines and damaged config.json files for the
planner. Reading and reporting never crash (only ``InvalidInput``), and every finding has a fixed regression case."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kvslim.cli import app
from kvslim.errors import InvalidInput
from kvslim.eval.harness.store import ResultStore
from kvslim.eval.reports.report import build_report

RECORD = {"task": "passkey", "model": "m", "recipe": "full", "length": 400, "depth": 0.5, "seed": 0, "success": True,
          "score": -0.5, "kv_bytes": 1000, "kv_bytes_full16": 500, "prompt_tokens": 400, "answer": "12345"}
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=5)
MUTATED = st.builds(lambda k, v, drop: {**{a: b for a, b in RECORD.items() if a != drop}, **({k: v} if k else {})},
                    st.sampled_from([None, *RECORD]), JSON, st.sampled_from([None, *RECORD]))
LINE = st.one_of(MUTATED.map(lambda r: json.dumps(r).encode()), JSON.map(lambda v: json.dumps(v).encode()),
                 st.binary(max_size=40).filter(lambda b: b"\n" not in b))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINE, max_size=6), newline=st.booleans())
def test_any_damaged_results_file_reads_and_reports_without_crashing(lines, newline):
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(tmp)
        store.results.write_bytes(b"\n".join([json.dumps(RECORD).encode(), *lines]) + (b"\n" if newline else b""))
        store.repair()
        found = store.read()
        assert found.records[0] == RECORD
        assert len(found.records) + len(found.bad) + sum(len(x[1]) - 1 for x in found.duplicates) == len(
            [x for x in store.results.read_bytes().split(b"\n") if x.strip()])
        try:
            build_report(tmp, images=False)
        except InvalidInput:
            pass


@pytest.mark.parametrize("content,text", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "not a config object"),
    (b'{"model_type": "llama", "num_hidden_layers": "abc", "hidden_size": 64}', "positive whole number"),
    (b'{"model_type": "llama", "num_hidden_layers": -2, "hidden_size": 64, "num_attention_heads": 4}', "= -2"),
    (b'{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 0}', "= 0"),
    (b'{"model_type": "gemma3_text", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, '
     b'"vocab_size": 10, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": null}', "cannot be planned"),
])
def test_damaged_planner_configs_are_one_line(tmp_path, content, text):
    (tmp_path / "config.json").write_bytes(content)
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "config.json"), "--context", "1k"])
    assert res.exit_code == 2 and text in res.output and "Traceback" not in res.output, res.output


def test_store_files_that_are_folders_are_refused_before_loading(tmp_path):
    from kvslim.eval.harness.runner import Grid, run_grid

    (tmp_path / "results.jsonl").mkdir()
    with pytest.raises(InvalidInput, match="is not a file"):
        run_grid(Grid("passkey", "tiny-llama", ["full"], [400]), tmp_path, pair=("unused", "unused"), progress=False)
    assert not Path(tmp_path / "config.json").exists()
