"""The report, built from a fixture results file with known numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvslim.errors import InvalidInput
from kvslim.eval.harness.store import ResultStore
from kvslim.eval.reports.report import build_report, markdown_table, summarize, table_rows

FIXTURE = Path(__file__).parent / "data" / "niah_results.jsonl"
# The fixture: recipes full (float32: 2x a 16-bit cache) and small (0.25x); lengths 1000/2000, depths 0/1, seeds 0/1.
# full always succeeds; small succeeds only at depth 1, at 1000 for both seeds and at 2000 for seed 0 only.


@pytest.fixture
def folder(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "results.jsonl")
    return tmp_path


def test_summary_numbers(folder):
    (s,) = summarize(ResultStore(folder).records())
    assert (s.task, s.model, s.metric, s.lengths, s.depths) == ("passkey", "fixture-model", "accuracy", [1000, 2000], [0.0, 1.0])
    full, small = s.rows
    assert full.recipe == "full" and full.acc == {1000: 1.0, 2000: 1.0} and full.ratio16 == {1000: 2.0, 2000: 2.0}
    assert small.acc == {1000: 0.5, 2000: 0.25} and small.mean_acc == pytest.approx(0.375)
    assert small.ratio16[2000] == 0.25 and small.kv_bytes[2000] == 500_000 and small.bytes_per_token == 250
    assert small.grid == {(0.0, 1000): 0.0, (1.0, 1000): 1.0, (0.0, 2000): 0.0, (1.0, 2000): 0.5}
    assert small.score[1000] == pytest.approx((-20 * 2 - 0.5 * 2) / 4)


def test_table_and_files(folder):
    res = build_report(folder)
    names = {Path(f).name for f in res["files"]}
    assert names == {"heatmap-full.png", "heatmap-small.png", "frontier.png", "summary.md", "summary.json"}
    for f in res["files"]:
        assert Path(f).stat().st_size > 100
    assert (folder / "heatmap-small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(res["summaries"][0])
    assert "| small | 0.50 [0.15, 0.85] n=4 | 0.25 [0.05, 0.70] n=4 | 0.38 [0.14, 0.69] n=8 |" in table
    assert "0.250x" in table and "2.000x" in table and "488.3 KiB" in table
    md = (folder / "summary.md").read_text()
    assert table in md and "![small](heatmap-small.png)" in md


def test_report_of_nothing_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="no results.jsonl"):
        build_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(InvalidInput, match="no finished cells"):
        build_report(tmp_path)


def test_tier_columns_only_where_a_recipe_has_a_cold_tier(folder):
    """A tiered recipe's cold bytes and per-step fetch are columns with their ratio to a 16-bit full cache; records
    without the fields (the fixture, written before they existed) still load and add no column."""
    import json

    head, _ = table_rows(summarize(ResultStore(folder).records())[0])
    assert not any("cold" in h or "fetched" in h for h in head)
    lines = (folder / "results.jsonl").read_text().splitlines()
    extra = []
    for line in lines:
        r = json.loads(line)
        if r["recipe"] == "small":
            r.update(recipe="tiered", kv_bytes=r["kv_bytes"] // 10, cold_bytes=900_000 * r["length"] // 1000,
                     fetched_bytes=2_000 + 2 * r["length"])
            extra.append(json.dumps(r))
    (folder / "results.jsonl").write_text("\n".join(lines + extra) + "\n")
    res = build_report(folder, images=False)
    s = res["summaries"][0]
    tiered = next(r for r in s.rows if r.recipe == "tiered")
    assert tiered.cold == {1000: 900_000, 2000: 1_800_000} and tiered.fetched == {1000: 4_000, 2000: 6_000}
    assert all(not r.cold and not r.fetched for r in s.rows if r.recipe != "tiered")
    table = markdown_table(s)
    assert "cold bytes@2000" in table.splitlines()[0] and "fetched/step@2000" in table.splitlines()[0]
    row = next(line for line in table.splitlines() if line.startswith("| tiered "))
    assert "1.7 MiB (0.900x)" in row and "5.9 KiB (0.003x)" in row  # full16 at 2000 tokens: 2,000,000 B
    assert next(line for line in table.splitlines() if line.startswith("| small ")).endswith("| - | - |")
    saved = json.loads((folder / "summary.json").read_text())[0]["rows"]
    assert next(r for r in saved if r["recipe"] == "tiered")["cold_bytes"] == {"1000": 900_000, "2000": 1_800_000}


PLACED = ("recall", "recall:store=disk", "recall:dir=/tmp/kvslim-x,store=disk")  # one computation, three placements
LONG = ("recall:k=12,pin=4,span=2+fp8", "recall:k=8,pin=4,span=2+fp8")  # differ past the first 7 characters


def _store_with(tmp_path, names):
    lines = FIXTURE.read_text().splitlines()
    out = [ln for ln in lines if '"recipe": "full"' in ln]
    for name in names:
        out += [ln.replace('"recipe": "small"', f'"recipe": "{name}"') for ln in lines if '"recipe": "small"' in ln]
    (tmp_path / "results.jsonl").write_text("\n".join(out) + "\n")


def test_store_and_dir_are_not_part_of_a_recipes_identity(tmp_path):
    # issue 25, 3.8: store=/dir= (where cold bytes live) made one computation three rows
    from kvslim.cache.recipe import canonical, identity, placement

    plain = "recall:k=12,pin=4,span=2"  # the defaults (issue 24, part 5; a bare `recall` key means the old ones)
    assert {identity(n) for n in PLACED} == {plain} and identity("recall-fp8") == canonical("recall-fp8")
    assert canonical("recall:store=disk") == plain + ",store=disk" and placement("recall:store=disk") == "store=disk"
    _store_with(tmp_path, PLACED)
    res = build_report(tmp_path, images=False)
    (s,) = res["summaries"]
    assert [r.recipe for r in s.rows] == ["full", "recall:k=8,pin=0,span=1"] and s.rows[1].cells == 8  # stored: old
    assert any("stored 3 times with identical results" in w for w in res["warnings"])


def test_report_rows_are_distinguishable_at_80_columns(tmp_path, monkeypatch):
    # issue 25, 3.8: long recipe names printed as "recal…" at 80 columns, several rows alike
    from typer.testing import CliRunner

    from kvslim.cli import _common, app

    monkeypatch.setattr(_common.console, "width", 80)
    _store_with(tmp_path, LONG)
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--no-images"])
    assert res.exit_code == 0, res.output
    table = [ln for ln in res.output.splitlines() if ln.startswith("│")]
    assert table and max(len(ln) for ln in table) <= 80 and "…" not in res.output
    first_column = "".join(ln.split("│")[1].strip() for ln in table)
    for name in LONG:
        assert name in first_column
