"""`kvslim plan --recipe`: recipes priced from the method objects the caches use."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvslim.cli import app
from kvslim.errors import InvalidInput
from kvslim.plan.presets import preset
from kvslim.plan.pricing import price_recipe

runner = CliRunner()


def test_plan_prices_a_recipe_beside_full():
    res = runner.invoke(app, ["plan", "smollm2-135m", "--recipe", "v4+tq3", "--context", "8k", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    assert [r["recipe"] for r in rows] == ["full", "v4+tq3"]
    full, v4 = rows
    assert v4["kv_bytes"] < full["kv_bytes"] / 10 and v4["read_bytes"] < v4["kv_bytes"]
    assert v4["decode_flops"] < full["decode_flops"]
    table = runner.invoke(app, ["plan", "smollm2-135m", "-r", "v4-tq3", "-c", "1k"])
    assert table.exit_code == 0 and "v4+tq3" in table.output


def test_full_recipe_is_the_stock_cache_plus_validity_bytes():
    arch = preset("smollm2-135m")  # 30 layers, 3 KV heads, head dim 64
    n = 1000
    p = price_recipe(arch, "full", n, "bf16")
    assert p["kv_bytes"] == 30 * (n * 2 * 3 * 64 * 2 + n)  # K+V in bf16 + one validity byte per token
    assert p["read_bytes"] == 30 * n * 2 * 3 * 64 * 2


def test_refusals():
    with pytest.raises(InvalidInput, match="GQA"):
        price_recipe(preset("deepseek-v3"), "v4", 1024)
    with pytest.raises(InvalidInput, match="dtype"):
        price_recipe(preset("smollm2-135m"), "v4", 1024, "tq3")
    with pytest.raises(InvalidInput, match="head dim 64"):
        price_recipe(preset("smollm2-135m"), "latent:r=128", 1024)
    bad = runner.invoke(app, ["plan", "smollm2-135m", "-r", "v4", "-b", "llama-3.1-8b"])
    assert bad.exit_code == 2 and "does not combine" in bad.output
