"""Batched cells give the records one-by-one cells give (answers, scores, bytes), on the tiny models."""

from __future__ import annotations

import pytest

from _eval_helpers import window_double
from kvslim.eval.harness.batch import batches
from kvslim.eval.harness.runner import Grid, run_grid
from kvslim.eval.harness.store import ResultStore
from kvslim.eval.harness.tiny import tiny_pair

FACTORIES = {"win": window_double(48)}


def records(out):
    recs = ResultStore(out).records()
    return {(r["recipe"], r["length"], r["depth"], r["seed"]): r for r in recs}


@pytest.mark.parametrize("name,task,recipes,length", [
    ("tiny-llama", "passkey", ["win", "window:w=64"], 500),
    ("tiny-gemma3", "niah_multivalue", ["win"], 900),
    ("tiny-llama", "passkey", ["recall:m=4,k=2,w=16,sinks=2"], 500),
    pytest.param("tiny-gemma3", "niah_multikey_1", ["v4-fp8"], 900, marks=pytest.mark.slow),
])
def test_batched_cells_equal_one_by_one(tmp_path, name, task, recipes, length):
    pair = tiny_pair(name)
    g = Grid(task=task, model=name, recipes=recipes, lengths=[length], depths=[0, 1], seeds=[0, 1],
             options={"max_new_tokens": 6})
    run_grid(g, tmp_path / "one", pair=pair, factories=FACTORIES, progress=False)
    res = run_grid(g, tmp_path / "many", pair=pair, factories=FACTORIES, progress=False, batch=4)
    one, many = records(tmp_path / "one"), records(tmp_path / "many")
    assert res["ran"] == len(one) == len(many) == 4 * (1 + len(recipes))
    for key, a in one.items():
        b = many[key]
        for field in ("answer", "success", "retrieved", "kv_bytes", "kv_bytes_full16", "prompt_hash", "expected"):
            assert a[field] == b[field], (key, field)
        for field in ("cold_bytes", "fetched_bytes"):  # a tiered cache's, per row; absent for the others
            assert a.get(field) == b.get(field), (key, field)
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)


def test_batches_group_by_recipe_and_length():
    class C:
        def __init__(self, recipe):
            self.recipe = recipe

    todo = [(C("a"), [0] * 5), (C("b"), [0] * 5), (C("a"), [0] * 5), (C("a"), [0] * 7), (C("a"), [0] * 5)]
    groups = batches(todo, 2)
    assert [[(c.recipe, len(p)) for c, p in g] for g in groups] == [
        [("a", 5), ("a", 5)], [("a", 5)], [("b", 5)], [("a", 7)]]
