"""The suite through the CLI (run, resume, report, compare) and the suite tables on fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvslim.eval.harness.store import ResultStore
from kvslim.eval.harness.suite import suite_grids
from kvslim.eval.reports.suite_report import compare, suite_records, suite_tables

FIXTURE = Path(__file__).parent / "data" / "niah_results.jsonl"


def test_compare_on_the_fixture(tmp_path):
    # full always succeeds; small succeeds in 3 of the 8 shared prompts and never where full fails
    shutil.copy(FIXTURE, tmp_path / "results.jsonl")
    ((task, p),) = compare(suite_records(tmp_path), "full", "small")
    assert task == "passkey" and (p.n, p.a_better, p.b_better) == (8, 5, 0)
    assert p.p == pytest.approx(2 / 32) and not p.differ


def test_suite_table_averages_tasks():
    def rec(task, length, score, i):
        return {"task": task, "model": "m", "recipe": "full", "length": length, "depth": 0.0, "seed": i,
                "retrieved": score, "success": score == 1.0}

    by_task = {"a": [rec("a", 1000, 1.0, i) for i in range(4)],
               "b": [rec("b", 1000, s, i) for i, s in enumerate([0.0, 0.5, 0.5, 1.0])]}
    (t,) = suite_tables(by_task)
    assert t["rows"]["a"][1000]["score"] == 1.0 and t["rows"]["b"][1000]["score"] == 0.5
    avg = t["rows"]["average"][1000]
    assert avg["score"] == 0.75 and avg["n"] == 8 and avg["ci"][0] < 0.75 < avg["ci"][1]


def test_depth_free_tasks_get_as_many_cells():
    grids = suite_grids("ruler", model="tiny-llama", recipes=["full"], lengths=[2000], depths=[0, 0.5, 1],
                        seeds=[0, 1])
    by = {g.task: g for g in grids}
    assert by["cwe"].seeds == [0, 1, 2, 1000, 1001, 1002] and by["vt"].seeds == [0, 1]


def test_cli_suite_run_resume_report_compare(tmp_path):
    from kvslim.cli import app

    runner = CliRunner()
    out = tmp_path / "suite"
    args = ["niah", "--suite", "ruler", "--suite-tasks", "niah_single_1,fwe", "-m", "tiny-llama", "-r", "window:w=64",
            "-l", "1600", "-d", "0,1", "-n", "4", "--batch", "2", "-o", str(out), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["ran"] == 8
    assert json.loads((out / "suite.json").read_text()) == {"suite": "ruler", "tasks": ["niah_single_1", "fwe"]}
    assert len(ResultStore(out / "fwe").records()) == 4
    again = runner.invoke(app, args)
    assert json.loads(again.output.strip().splitlines()[-1])["ran"] == 0
    rep = runner.invoke(app, ["report", str(out), "--no-images", "--compare", "full", "window:w=64"])
    assert rep.exit_code == 0, rep.output
    assert "RULER score of full on tiny-llama" in rep.output and "average" in rep.output
    assert "exact sign test" in rep.output and "all tasks:" in rep.output
    assert "RULER score of window:w=64" in (out / "summary.md").read_text()
    js = json.loads(runner.invoke(app, ["report", str(out), "--no-images", "--json", "--compare", "full",
                                        "window:w=64"]).output)
    assert js["compare"][-1]["task"] == "all tasks" and js["compare"][-1]["n"] == 4
    assert js["summaries"][0]["rows"][0]["mean_acc_ci"][0] <= js["summaries"][0]["rows"][0]["mean_acc"]
    bad = runner.invoke(app, ["report", str(out), "--compare", "full", "nope"])
    assert bad.exit_code == 2 and "no cells" in bad.output
    bad = runner.invoke(app, ["niah", "--suite", "nope", "-m", "tiny-llama", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown suite" in bad.output
    bad = runner.invoke(app, ["niah", "--suite", "ruler", "--suite-tasks", "passkey", "-m", "tiny-llama",
                              "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not in the ruler suite" in bad.output
    bad = runner.invoke(app, ["niah", "-t", "vt", "--opt", "hops", "-m", "tiny-llama", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


@pytest.mark.parametrize("args, needle", [
    (["-t", "passkey", "--suite-tasks", "vt"], "--suite-tasks picks tasks of a --suite"),
    (["--suite-tasks", "vt"], "--suite-tasks picks tasks of a --suite"),
    (["--suite", "ruler", "-t", "vt"], "are exclusive"),
    (["--suite", "ruler", "--suite-tasks", ""], "names no task"),
    (["--suite", "ruler", "--suite-tasks", " , "], "names no task"),
    (["-t", "fwe", "-d", "0,0.5,1"], "--depths does not apply to fwe"),
    (["-t", "cwe", "-d", "0"], "--depths does not apply to cwe"),
    (["-t", "vt", "--opt", "hops=2", "--opt", "hops=3"], "--opt hops is given twice"),
    (["-t", "multi-needle", "-k", "3", "--opt", "k=4"], "set the same option"),
])
def test_ignored_niah_options_are_refused(tmp_path, args, needle):
    # issue 25, 3.12: each of these was silently ignored (or ran every suite task / one depth-0 cell)
    from kvslim.cli import app

    res = CliRunner().invoke(app, ["niah", "-m", "tiny-llama", "-o", str(tmp_path / "x"), *args])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def _fixture_with(tmp_path, *names):
    """The fixture's ``small`` cells stored once under each of ``names`` (recipe spellings as a store holds them)."""
    lines = FIXTURE.read_text().splitlines()
    out = [ln for ln in lines if '"recipe": "full"' in ln]
    for name in names:
        out += [ln.replace('"recipe": "small"', f'"recipe": "{name}"') for ln in lines if '"recipe": "small"' in ln]
    (tmp_path / "results.jsonl").write_text("\n".join(out) + "\n")


def test_compare_canonicalises_recipe_names(tmp_path):
    # issue 25, 3.1: the README's `--compare full full-kivi2` and --help's `--compare full stream` said "has no cells
    # here" (the store holds full+kivi2 and window); `--compare full full` ran a recipe against itself
    from kvslim.cli import app

    _fixture_with(tmp_path, "full+kivi2", "window:w=256,sinks=4")
    runner = CliRunner()
    for other, canon in (("full-kivi2", "full+kivi2"), ("stream", "window"), ("window:sinks=4", "window")):
        res = runner.invoke(app, ["report", str(tmp_path), "--no-images", "--compare", "full", other])
        assert res.exit_code == 0, res.output
        assert f"full vs {canon} on 8 shared prompts" in res.output
        ((task, p),) = compare(suite_records(tmp_path), "full", other)
        assert (p.n, p.a_better, p.b_better) == (8, 5, 0)
    for a, b in (("full", "full"), ("stream", "window"), ("full-kivi2", "full+kivi2")):
        res = runner.invoke(app, ["report", str(tmp_path), "--no-images", "--compare", a, b])
        assert res.exit_code == 2 and "two different recipes" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
