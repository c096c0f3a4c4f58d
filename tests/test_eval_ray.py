"""The Ray executor gives the same records as the local one (a local Ray cluster, a tiny grid)."""

from __future__ import annotations

import json

import pytest

from kvslim.eval.harness.runner import Grid, run_grid

pytest.importorskip("ray")


def records(out):
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return sorted(recs, key=lambda r: (r["recipe"], r["length"], r["depth"], r["seed"]))


@pytest.mark.slow  # starting a local Ray cluster takes ~10-30 s
def test_ray_and_local_give_the_same_results(tmp_path):
    grid = Grid(task="passkey", model="tiny-llama", recipes=["stream"], lengths=[400], depths=[0, 1], seeds=[0, 1])
    run_grid(grid, tmp_path / "local", progress=False, threads=1)
    res = run_grid(grid, tmp_path / "ray", ray="local", workers=2, progress=False, threads=1)
    assert res["ran"] == 8
    local, ray = records(tmp_path / "local"), records(tmp_path / "ray")
    assert len(local) == len(ray) == 8
    for a, b in zip(local, ray, strict=True):
        for k in ("recipe", "length", "depth", "seed", "success", "answer", "kv_bytes", "prompt_hash", "needle_positions"):
            assert a[k] == b[k], k
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
