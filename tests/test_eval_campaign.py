"""The campaign runner on the tiny models: slice order and one model at a time, the budget's clean stop and what
is left, resume (finished cells skipped, the same records as one uninterrupted run), busy folders retried later;
the bench scripts' campaigns read the method registry and the models' configs."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from _eval_helpers import window_double
from kvslim.eval.harness.campaign import Slice, pending_cells, run_campaign
from kvslim.eval.harness.runner import Grid
from kvslim.eval.harness.store import ResultStore, StoreBusy
from kvslim.eval.harness.tiny import tiny_pair

DOUBLE = {"win": window_double(48)}
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def pairs():
    return {name: tiny_pair(name) for name in ("tiny-llama", "tiny-gemma3")}


class Loader:
    """``load=`` for the campaign: the module's tiny pairs, each name recorded."""

    def __init__(self, pairs):
        self.pairs, self.names = pairs, []

    def __call__(self, name):
        self.names.append(name)
        return self.pairs[name]


class Clock:
    """A clock the test moves: ``step`` seconds per stored cell (through ``on_record``)."""

    def __init__(self, step=0.0):
        self.t, self.step = 0.0, step

    def __call__(self):
        return self.t

    def tick(self, _rec):
        self.t += self.step


def piece(tmp, model="tiny-llama", task="passkey", lengths=(400,), depths=(0,), name=None):
    grid = Grid(task=task, model=model, recipes=["win"], lengths=list(lengths), depths=list(depths), seeds=[0])
    return Slice(grid, tmp / (name or f"{model}-{task}-{'-'.join(map(str, lengths))}"))


def keys(out):
    return [(r["task"], r["model"], r["recipe"], r["length"], r["depth"], r["seed"]) for r in ResultStore(out).records()]


def strip(out):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in ResultStore(out).records()]


def test_slices_run_in_order_with_one_model_at_a_time(tmp_path, pairs):
    plan = [piece(tmp_path, "tiny-llama", lengths=[400]), piece(tmp_path, "tiny-llama", "needle"),
            piece(tmp_path, "tiny-gemma3"), piece(tmp_path, "tiny-llama", lengths=[450])]
    load, said = Loader(pairs), []
    res = run_campaign(plan, load=load, say=said.append, factories=DOUBLE, progress=False)
    assert load.names == ["tiny-llama", "tiny-gemma3", "tiny-llama"]  # consecutive slices of a model share it
    assert [s for s, _ in res.done] == plan and not res.stopped and res.left == []
    assert (res.ran, res.skipped, res.total) == (8, 0, 8)
    assert [line.split(" -> ")[0] for line in said if line.startswith("==")] == [
        "== tiny-llama passkey 400 tokens", "== tiny-llama needle 400 tokens", "== tiny-gemma3 passkey 400 tokens",
        "== tiny-llama passkey 450 tokens"]
    for s in plan:
        assert [k[2] for k in keys(s.out)] == ["full", "win"] and {k[1] for k in keys(s.out)} == {s.grid.model}
    again = run_campaign(plan, load=load, factories=DOUBLE, progress=False)
    assert (again.ran, again.skipped, again.total) == (0, 8, 8)


def test_budget_stops_cleanly_and_resume_gives_the_same_records(tmp_path, pairs):
    plan = [piece(tmp_path / "cut", lengths=[400, 450], depths=[0, 1]), piece(tmp_path / "cut", "tiny-llama", "needle")]
    clock, said = Clock(step=6.0), []
    res = run_campaign(plan, budget_s=10, clock=clock, say=said.append, pair=pairs["tiny-llama"], factories=DOUBLE,
                       progress=False, on_record=clock.tick)
    # the second stored cell crosses the 10 s budget: it is kept, and no further cell starts
    assert res.stopped and res.ran == 2 and res.done == []
    assert len(ResultStore(plan[0].out).records()) == 2 and not plan[1].out.exists()
    assert [(x.slice, x.cells, x.total) for x in res.left] == [(plan[0], 6, 8), (plan[1], 2, 2)]
    assert pending_cells(plan[0], DOUBLE) == (6, 8)
    assert "   budget of 0.166667 min spent: stopping" in said
    assert any(line.startswith("   left: tiny-llama passkey 400,450 tokens (6 of 8 cells)") for line in said)
    assert json.loads(json.dumps(res.to_dict()))["left"][1]["cells"] == 2

    rest = run_campaign(plan, pair=pairs["tiny-llama"], factories=DOUBLE, progress=False)
    assert not rest.stopped and (rest.ran, rest.skipped, rest.total) == (8, 2, 10)
    whole = [Slice(s.grid, tmp_path / "whole" / s.out.name) for s in plan]
    run_campaign(whole, pair=pairs["tiny-llama"], factories=DOUBLE, progress=False)
    for cut, one in zip(plan, whole, strict=True):
        assert keys(cut.out) == keys(one.out)  # the same cells in the same order as one uninterrupted run
        assert strip(cut.out) == strip(one.out)  # and the same records


def test_budget_spent_between_slices_starts_no_model(tmp_path, pairs):
    plan = [piece(tmp_path, "tiny-llama"), piece(tmp_path, "tiny-gemma3")]
    clock, load = Clock(step=6.0), Loader(pairs)
    res = run_campaign(plan, budget_s=10, clock=clock, load=load, factories=DOUBLE, progress=False,
                       on_record=clock.tick)
    assert res.stopped and res.ran == 2 and load.names == ["tiny-llama"]
    assert [(x.slice, x.cells) for x in res.left] == [(plan[1], 2)]  # the first slice finished: not left


def test_slice_options_override_the_campaigns(tmp_path, pairs):
    one = piece(tmp_path, lengths=[400], name="a")
    two = Slice(piece(tmp_path, lengths=[400]).grid, tmp_path / "b", run={"factories": {"win": window_double(16)}})
    run_campaign([one, two], pair=pairs["tiny-llama"], factories=DOUBLE, progress=False)
    kv = [{r["recipe"]: r["kv_bytes"] for r in ResultStore(s.out).records()} for s in (one, two)]
    assert kv[0]["full"] == kv[1]["full"] and kv[1]["win"] < kv[0]["win"]


def test_a_busy_folder_is_retried_after_the_rest(tmp_path, pairs):
    plan = [piece(tmp_path, task="passkey"), piece(tmp_path, task="needle")]
    other = ResultStore(plan[0].out)
    other.lock()  # another live run holds the first folder
    try:
        with pytest.raises(StoreBusy):
            run_campaign(plan, pair=pairs["tiny-llama"], factories=DOUBLE, progress=False)
        waits = []

        def sleep(s):
            waits.append(s)
            other.unlock()  # the other run finishes while this one waits

        res = run_campaign(plan, busy="later", wait_s=7, sleep=sleep, pair=pairs["tiny-llama"], factories=DOUBLE,
                           progress=False)
    finally:
        other.unlock()
    assert [s for s, _ in res.done] == [plan[1], plan[0]] and waits == [7] and res.ran == 4


def test_bad_busy_mode_is_refused(tmp_path):
    from kvslim.errors import InvalidInput

    with pytest.raises(InvalidInput, match="busy must be"):
        run_campaign([], busy="wait")


def _bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_niah_baseline_campaign_reads_the_registries(tmp_path):
    from kvslim.cache.method import methods
    from kvslim.cache.methods import FAMILY

    niah = _bench("niah_baseline")
    assert niah.eviction() == tuple(n for n in methods() if FAMILY.get(n) == "evict")
    assert niah.eviction() == ("streaming", "snapkv", "tova", "h2o", "knorm", "expattn")
    assert niah.family("tova:keep=0.5+tq4") == "baseline" and niah.family("recall") == "kvslim"
    assert niah.family("full+tq4") == "quant" and niah.family("full") == "reference"
    args = argparse.Namespace(models=["smollm2-135m", "gemma3-270m"], tasks=["passkey", "needle"], recipes=["full"],
                              depths=[0.5], seeds=[0], aware=False, prefill_chunk=512,
                              lengths_of=lambda m: [n for n in niah.GRID[m] if n <= 4000])
    plan = niah.slices(args)
    assert [(s.grid.lengths[0], s.grid.model, s.grid.task) for s in plan] == [
        (1000, "smollm2-135m", "needle"), (1000, "smollm2-135m", "passkey"), (1000, "gemma3-270m", "needle"),
        (1000, "gemma3-270m", "passkey"), (2000, "smollm2-135m", "needle"), (2000, "smollm2-135m", "passkey"),
        (4000, "smollm2-135m", "needle"), (4000, "smollm2-135m", "passkey"), (4000, "gemma3-270m", "needle"),
        (4000, "gemma3-270m", "passkey")]  # cheapest first: by length, then model, then task
    assert {s.grid.model: s.run["prefill_chunk"] for s in plan} == {"smollm2-135m": 0, "gemma3-270m": 512}


def test_ruler_baseline_campaign_goes_model_by_model():
    ruler = _bench("ruler_baseline")
    args = argparse.Namespace(models=["smollm2-135m", "gemma3-270m"], tasks=["vt", "cwe"], recipes=["full"],
                              depths=[0, 1], seeds=[0], lengths_of=lambda m: ruler.GRID[m][:2])
    plan = ruler.slices(args)
    assert [(s.grid.model, s.grid.lengths[0], s.grid.task) for s in plan] == [
        ("smollm2-135m", 1000, "vt"), ("smollm2-135m", 1000, "cwe"), ("smollm2-135m", 2000, "vt"),
        ("smollm2-135m", 2000, "cwe"), ("gemma3-270m", 1000, "vt"), ("gemma3-270m", 1000, "cwe"),
        ("gemma3-270m", 4000, "vt"), ("gemma3-270m", 4000, "cwe")]
    assert plan[1].out == ruler.STORE / "smollm2-135m" / "cwe" and plan[1].grid.seeds == [0, 1]


def test_models_with_sliding_layers_come_from_their_configs(tiny_llama, tiny_gemma3):
    from kvslim.models import describe, embedded_facts

    assert describe(tiny_gemma3.config).has_sliding and not describe(tiny_llama.config).has_sliding
    assert embedded_facts("gemma3-270m").has_sliding and not embedded_facts("smollm2-135m").has_sliding
