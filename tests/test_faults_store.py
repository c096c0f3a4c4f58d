"""Issue 15, results store: one writer per folder, repair that keeps complete records, validated lines, first-wins
duplicates, canonical recipes, a clear error for a broken config.json, options checked before config.json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from _eval_helpers import window_double
from kvslim.cli import app
from kvslim.errors import InvalidInput
from kvslim.eval.harness.runner import Grid, run_grid
from kvslim.eval.harness.store import ResultStore
from kvslim.eval.harness.tiny import tiny_pair
from kvslim.eval.reports.report import build_report

DOUBLE = {"win": window_double(48)}


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-llama")


def grid(**kw):
    base = dict(task="passkey", model="tiny-llama", recipes=["win"], lengths=[400], depths=[0, 1], seeds=[0])
    base.update(kw)
    return Grid(**base)


def run(out, pair, **kw):
    msgs: list[str] = []
    res = run_grid(grid(**kw), out, factories=DOUBLE, pair=pair, progress=False, warn=msgs.append)
    return res, msgs


def raw_lines(out):
    return (out / "results.jsonl").read_bytes().split(b"\n")


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, pair):
    holder = ResultStore(tmp_path)
    holder.lock()
    with pytest.raises(InvalidInput, match=r"another kvslim run \(pid \d+\)"):
        run(tmp_path, pair)
    assert not (tmp_path / "results.jsonl").exists()
    holder.unlock()
    assert run(tmp_path, pair)[0]["ran"] == 4


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, pair):
    (tmp_path / ".lock").write_text("999999999\n")  # no such pid; nobody holds the flock
    assert run(tmp_path, pair)[0]["ran"] == 4


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path, pair):
    run(tmp_path, pair)
    data = (tmp_path / "results.jsonl").read_bytes()
    (tmp_path / "results.jsonl").write_bytes(data[:-1])  # killed between the record and its newline
    res, _ = run(tmp_path, pair)
    assert (res["ran"], res["skipped"]) == (0, 4)
    assert (tmp_path / "results.jsonl").read_bytes() == data


BAD_LINES = {
    "not-utf8": b'{"task": "passkey", "answer": "\xff\xfe"}',
    "null": b"null",
    "number": b"42",
    "no-score": None,  # filled from a real record below
    "length-abc": None,
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_bad_lines_are_reported_with_their_number_and_skipped(tmp_path, pair, kind):
    run(tmp_path, pair)
    lines = raw_lines(tmp_path)[:-1]
    rec = json.loads(lines[1])
    bad = BAD_LINES[kind]
    if kind == "no-score":
        del rec["score"]
        bad = json.dumps(rec).encode()
    elif kind == "length-abc":
        rec["length"] = "abc"
        bad = json.dumps(rec).encode()
    (tmp_path / "results.jsonl").write_bytes(b"\n".join([lines[0], bad, *lines[2:]]) + b"\n")
    report = build_report(tmp_path, images=False)
    assert any("line 2:" in w and "skipped" in w for w in report["warnings"]), report["warnings"]
    assert sum(r.cells for r in report["summaries"][0].rows) == 3
    res, msgs = run(tmp_path, pair)  # resume: the bad line's cell is run again, the rest skipped
    assert (res["ran"], res["skipped"]) == (1, 3) and any("line 2:" in m for m in msgs)
    cli = CliRunner().invoke(app, ["report", str(tmp_path), "--no-images"])
    assert cli.exit_code == 0 and "warning:" in cli.output and "Traceback" not in cli.output


def test_a_broken_config_json_is_a_clear_error(tmp_path, pair):
    run(tmp_path, pair)
    (tmp_path / "config.json").write_text('{"format": 1, "task": ')
    with pytest.raises(InvalidInput, match="config.json is damaged"):
        run(tmp_path, pair)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(InvalidInput, match="not a JSON object"):
        run(tmp_path, pair)


def test_duplicate_cells_count_once_and_conflicts_are_named(tmp_path, pair):
    run(tmp_path, pair)
    lines = [json.loads(x) for x in raw_lines(tmp_path)[:-1]]
    first = lines[0]
    other = dict(first, success=not first["success"], score=first["score"] - 5)  # a second writer's disagreeing copy
    with (tmp_path / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(lines[1]) + "\n" + json.dumps(other) + "\n")
    report = build_report(tmp_path, images=False)
    rows = {r.recipe: r for r in report["summaries"][0].rows}
    assert rows[first["recipe"]].cells == 2  # 2 depths, no duplicates counted
    expected = float(bool(first["success"]))
    assert rows[first["recipe"]].grid[(float(first["depth"]), 400)] == expected  # the first record wins
    text = " ".join(report["warnings"])
    assert "with different results (lines 1, 6)" in text and "with identical results (lines 2, 5)" in text
    assert "different results" in (tmp_path / "summary.md").read_text()


def test_spellings_of_one_recipe_are_one_row(tmp_path, pair):
    res, _ = run(tmp_path, pair, recipes=["stream", "window:w=256", "window"], depths=[0.5])
    assert res["total"] == 2
    recs = [json.loads(x) for x in raw_lines(tmp_path)[:-1]]
    assert sorted(r["recipe"] for r in recs) == ["full", "window"]


def test_options_are_range_checked_before_config_json(tmp_path):
    cli = CliRunner()
    for args in (["--max-new-tokens", "0"], ["--max-new-tokens", "-3"], ["-t", "fidelity", "--eval-tokens", "0"],
                 ["-t", "fidelity", "--eval-tokens", str(1 << 70)], ["-t", "multi-needle", "--needles", "0"],
                 ["--workers", "0", "--ray", "local"], ["--threads", "-1"], ["--seeds", "-1"],
                 ["--lengths", str(1 << 64)]):
        out = tmp_path / "o"
        res = cli.invoke(app, ["niah", "-m", "tiny-llama", "-l", "400", "-d", "0", "-o", str(out), *args])
        assert res.exit_code == 2 and "error:" in res.output, (args, res.output)
        assert not out.exists(), args


def test_library_options_are_checked_too(tmp_path, pair):
    for options in ({"max_new_tokens": 0}, {"max_new_tokens": 2.5}, {"chat": "yes"}):
        with pytest.raises(InvalidInput):
            run(tmp_path / "x", pair, options=options)
    with pytest.raises(InvalidInput, match="eval-tokens"):
        run(tmp_path / "x", pair, task="fidelity", options={"eval_tokens": 0})
    assert not (tmp_path / "x").exists()


def test_niah_takes_recipes_with_parameters(tmp_path):
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["niah", "-m", "tiny-llama", "-l", "400", "-d", "0.5", "-o", str(out), "--json",
                                   "-r", "full,blocks:m=8,k=16,w=64", "--recipe", "window:w=64,sinks=2"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["recipes"] == ["full", "blocks:k=16,m=8,w=64", "window:sinks=2,w=64"]
    res = CliRunner().invoke(app, ["niah", "-m", "tiny-llama", "-l", "400", "-d", "0.5", "-o", str(out), "--json",
                                   "-r", "blocks:w=64,m=8,k=16;window:sinks=2,w=64"])
    assert res.exit_code == 0 and json.loads(res.output.strip().splitlines()[-1])["ran"] == 0  # the same 3 recipes


def test_empty_out_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["niah", "-m", "tiny-llama", "-l", "400", "-d", "0", "-o", ""])
    assert res.exit_code == 2 and "--out is empty" in res.output
    assert list(tmp_path.iterdir()) == []


def test_report_outputs_are_checked_before_writing(tmp_path, pair):
    run(tmp_path, pair)
    (tmp_path / "summary.md").mkdir()
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "summary.md is a folder" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "heatmap-full.png").exists()  # nothing written before the check
