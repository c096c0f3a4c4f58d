"""`kvslim recipes` and `kvslim generate --recipe` argument handling (no real model is loaded)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from kvslim.cache.recipe import CODECS, KINDS, PRESETS
from kvslim.cli import app

runner = CliRunner()


def test_recipes_lists_every_name():
    res = runner.invoke(app, ["recipes", "--json"])
    assert res.exit_code == 0, res.output
    names = {r["name"] for r in json.loads(res.output)["recipes"]}
    assert set(KINDS) | set(PRESETS) | {f"+{c}" for c in CODECS if c != "none"} <= names
    table = runner.invoke(app, ["recipes"])
    assert table.exit_code == 0 and "v4" in table.output and "heavy" in table.output


def test_recipes_check_normalises_and_refuses():
    ok = runner.invoke(app, ["recipes", "--check", "blocks:k=16,m=8+tq3"])
    assert ok.exit_code == 0 and ok.output.strip() == "blocks:k=16,m=8+tq3"
    bad = runner.invoke(app, ["recipes", "--check", "blocks:m=0"])
    assert bad.exit_code == 2 and "m must be positive" in bad.output


def test_generate_refuses_a_bad_recipe_before_loading():
    res = runner.invoke(app, ["generate", "hello", "--model", "no-such-model", "--recipe", "heavy:k=3"])
    assert res.exit_code == 2
    assert "unknown key 'k'" in res.output and "no-such-model" not in res.output
