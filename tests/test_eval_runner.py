"""The grid runner and the store: identical prompts across recipes, resume after a kill, configs, bad input, CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from _eval_helpers import window_double
from kvslim.errors import ContextTooLong, InvalidInput
from kvslim.eval.harness.runner import Grid, run_grid
from kvslim.eval.harness.store import ResultStore
from kvslim.eval.harness.tiny import tiny_pair

DOUBLE = {"win": window_double(48)}
REQUIRED = {"task", "model", "recipe", "length", "depth", "seed", "success", "score", "kv_bytes", "seconds",
            "answer", "prompt_hash", "kv_bytes_full16"}


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-llama")


def grid(**kw):
    base = dict(task="passkey", model="tiny-llama", recipes=["win"], lengths=[400, 500], depths=[0, 1], seeds=[0])
    base.update(kw)
    return Grid(**base)


def lines(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_grid_runs_every_cell_with_identical_prompts(tmp_path, pair):
    res = run_grid(grid(), tmp_path, factories=DOUBLE, pair=pair, progress=False)
    recs = lines(tmp_path)
    assert res == {"ran": 8, "skipped": 0, "total": 8, "out": str(tmp_path / "results.jsonl")}
    assert all(REQUIRED <= set(r) for r in recs)
    assert {r["recipe"] for r in recs} == {"full", "win"}  # full is always a row
    for length in (400, 500):
        for depth in (0, 1):
            cell = [r for r in recs if r["length"] == length and r["depth"] == depth]
            assert len({r["prompt_hash"] for r in cell}) == 1 and len(cell) == 2
            by = {r["recipe"]: r for r in cell}
            assert by["win"]["kv_bytes"] < by["full"]["kv_bytes"]
            assert by["full"]["kv_bytes"] == 2 * by["full"]["kv_bytes_full16"]  # float32 full cache
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["task"] == "passkey" and cfg["recipes"] == ["full", "win"]


def test_tiered_records_carry_cold_and_fetched_bytes(tmp_path, pair):
    """A recall cell's record: hot bytes in kv_bytes, the cold tier after the prefill, the largest per-step fetch.
    tiny-llama: 2 layers x 2 KV heads x dim 16, float32; blocks of 4 tokens, top-2 fetched per KV head."""
    recipe = "recall:m=4,k=2,w=16,sinks=2"
    run_grid(grid(recipes=[recipe], lengths=[400], depths=[0.5]), tmp_path, pair=pair, progress=False)
    by = {r["recipe"]: r for r in lines(tmp_path)}
    assert "cold_bytes" not in by["full"] and "fetched_bytes" not in by["full"]  # DynamicCache: no tiers
    (rec,) = [r for name, r in by.items() if name != "full"]  # stored in canonical form
    n_blocks = (400 - 16 + 1 - 2) // 4  # blocks out of the window after the prefill
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x heads x dim x float32
    assert rec["cold_bytes"] == n_blocks * 4 * per_token
    assert rec["fetched_bytes"] == 2 * 4 * per_token  # k blocks x m tokens, every layer and head
    assert rec["kv_bytes"] < by["full"]["kv_bytes"] / 3  # hot: sinks, window of 16, two summary vectors a block


def test_resume_after_a_simulated_kill(tmp_path, pair):
    class Killed(Exception):
        pass

    seen = []

    def die_after_three(rec):
        seen.append(rec)
        if len(seen) == 3:
            raise Killed

    with pytest.raises(Killed):
        run_grid(grid(), tmp_path, factories=DOUBLE, pair=pair, progress=False, on_record=die_after_three)
    assert len(lines(tmp_path)) == 3
    with (tmp_path / "results.jsonl").open("a") as fh:  # a kill in the middle of writing the fourth line
        fh.write('{"task": "passkey", "model": "tiny-llama", "reci')
    res = run_grid(grid(), tmp_path, factories=DOUBLE, pair=pair, progress=False)
    assert (res["ran"], res["skipped"]) == (5, 3)
    recs = lines(tmp_path)
    keys = [(r["recipe"], r["length"], r["depth"], r["seed"]) for r in recs]
    assert len(recs) == 8 and len(set(keys)) == 8
    again = run_grid(grid(), tmp_path, factories=DOUBLE, pair=pair, progress=False)
    assert (again["ran"], again["skipped"]) == (0, 8) and len(lines(tmp_path)) == 8


def test_results_are_reproducible(tmp_path, pair):
    run_grid(grid(lengths=[400]), tmp_path / "a", factories=DOUBLE, pair=pair, progress=False)
    run_grid(grid(lengths=[400]), tmp_path / "b", factories=DOUBLE, pair=tiny_pair("tiny-llama"), progress=False)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in lines(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in lines(tmp_path / "b")]


def test_other_configurations_are_refused_unless_forced(tmp_path, pair):
    run_grid(grid(lengths=[400], depths=[0.5]), tmp_path, factories=DOUBLE, pair=pair, progress=False)
    with pytest.raises(InvalidInput, match="different configuration"):
        run_grid(grid(task="needle", lengths=[400]), tmp_path, factories=DOUBLE, pair=pair, progress=False)
    with pytest.raises(InvalidInput, match="different configuration"):
        run_grid(grid(lengths=[400], options={"max_new_tokens": 4}), tmp_path, factories=DOUBLE, pair=pair, progress=False)
    # growing the grid of the same configuration is fine
    res = run_grid(grid(lengths=[400, 450], depths=[0.5]), tmp_path, factories=DOUBLE, pair=pair, progress=False)
    assert (res["ran"], res["skipped"]) == (2, 2)
    assert json.loads((tmp_path / "config.json").read_text())["lengths"] == [400, 450]
    res = run_grid(grid(task="needle", lengths=[400], depths=[0.5]), tmp_path, factories=DOUBLE, pair=pair,
                   progress=False, force=True)
    assert res["ran"] == 2 and len(lines(tmp_path)) == 6


@pytest.mark.parametrize("kw,error,match", [
    (dict(task="nope"), InvalidInput, "unknown task"),
    (dict(model="nope"), InvalidInput, "unknown model"),
    (dict(recipes=["no-such-recipe"]), InvalidInput, "recipe"),
    (dict(lengths=[]), InvalidInput, "empty"),
    (dict(depths=[]), InvalidInput, "empty"),
    (dict(seeds=[]), InvalidInput, "empty"),
    (dict(depths=[0.5, 1.01]), InvalidInput, "outside"),
    (dict(depths=[-0.1]), InvalidInput, "outside"),
    (dict(depths=[float("nan")]), InvalidInput, "outside"),
    (dict(lengths=[0]), InvalidInput, "positive"),
    (dict(lengths=[400, 5000]), ContextTooLong, "maximum context is 4096"),
    (dict(options={"k": 3}), InvalidInput, "no option k"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, pair, kw, error, match):
    with pytest.raises(error, match=match):
        run_grid(grid(**kw), tmp_path / "out", factories=DOUBLE, pair=pair, progress=False)
    assert not (tmp_path / "out" / "results.jsonl").exists()
    assert not (tmp_path / "out" / "config.json").exists()


def test_fidelity_collapses_depths(tmp_path, pair):
    run_grid(grid(task="fidelity", lengths=[300], depths=[0, 0.5], options={"eval_tokens": 8}), tmp_path,
             factories=DOUBLE, pair=pair, progress=False)
    recs = lines(tmp_path)
    assert len(recs) == 2 and {r["depth"] for r in recs} == {0.0}
    by = {r["recipe"]: r for r in recs}
    assert by["full"]["score"] == pytest.approx(0.0, abs=1e-6) and by["full"]["success"] is None


def test_store_repair_and_skip_garbage(tmp_path):
    store = ResultStore(tmp_path)
    store.append({"task": "t", "model": "m", "recipe": "full", "length": 1, "depth": 0, "seed": 0, "success": True,
                  "score": 0.0, "kv_bytes": 8, "prompt_tokens": 1})
    with store.results.open("a") as fh:
        fh.write("{broken")
    assert len(store.records()) == 1 and store.repair() == len("{broken")
    assert store.results.read_text().endswith("\n")


def test_cli_niah_and_report(tmp_path):
    from kvslim.cli import app
    from kvslim.cli.cmd_niah import expand_bare_ray

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["niah", "-m", "tiny-gemma3", "-t", "needle", "-l", "400", "-d", "0,1", "-o", str(out), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["ran"] == 2
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and "acc@400" in res.output and (out / "heatmap-full.png").is_file()
    bad = runner.invoke(app, ["niah", "-m", "tiny-gemma3", "-d", "2", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "outside [0, 1]" in bad.output
    bad = runner.invoke(app, ["niah", "-m", "tiny-gemma3", "-l", "1k,x", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'x' is not a whole number" in bad.output
    assert expand_bare_ray(["niah", "--ray", "-o", "d"]) == ["niah", "--ray", "local", "-o", "d"]
    assert expand_bare_ray(["niah", "--ray"]) == ["niah", "--ray", "local"]
    assert expand_bare_ray(["--ray", "10.0.0.1:6379"]) == ["--ray", "10.0.0.1:6379"]


def test_recipes_are_checked_by_the_grammar():
    from kvslim.cache.recipe import parse_recipe
    from kvslim.eval.harness.caches import check_recipes

    assert check_recipes(["full"]) == ["full"]
    assert check_recipes(["v4-tq3", "full"]) == ["full", parse_recipe("v4+tq3")]  # parsed once, here
    parsed = parse_recipe("stream")
    assert check_recipes([parsed, "stream"])[1] is parsed  # a parsed recipe is not parsed again
    with pytest.raises(InvalidInput, match="unknown recipe 'nope'"):
        check_recipes(["nope"])
    assert check_recipes(["win"], extra=DOUBLE) == ["full", "win"]  # test doubles need no recipe of the grammar


def test_a_grid_parses_each_recipe_once_and_full_stays_the_dynamic_cache():
    # issue 23, part 2: the grid keeps each recipe's one parse (Grid.parsed -> Job.recipes); `full` given as a parsed
    # recipe (the CLI parses --recipes) is still the plain DynamicCache row, not a kvslim cache
    from transformers import DynamicCache

    from kvslim.cache.recipe import parse_recipe
    from kvslim.eval.harness.executors import Job

    stream = parse_recipe("stream")
    g = grid(recipes=[parse_recipe("full"), stream, "window:w=256,sinks=4", "v4+tq3"]).validate()
    assert g.recipes == ["full", "window", "v4+tq3"] and g.config()["recipes"] == g.recipes
    assert g.parsed["window"] is stream and g.parsed["v4+tq3"] == parse_recipe("v4-tq3") and "full" not in g.parsed
    job = Job(g.task, g.options, g.model, recipes=g.parsed)
    model, _tok = tiny_pair("tiny-llama")
    assert type(job.factory("full")(model)) is DynamicCache
    assert job.factory("window")(model).recipe is stream


def test_placements_of_one_recipe_run_once_and_resume_each_other(tmp_path, pair):
    # issue 25, 3.8: recall, recall:store=disk and recall:...,dir=... compute the same; they ran as three rows
    base = "recall:m=4,k=2,w=16,sinks=2"
    g = grid(recipes=[f"{base},store=disk", base, f"{base},store=disk,dir={tmp_path}"], lengths=[400], depths=[0],
             options={"max_new_tokens": 2})
    res = run_grid(g, tmp_path / "out", pair=pair, progress=False)
    assert (res["ran"], res["total"]) == (2, 2)
    rec = {r["recipe"]: r for r in lines(tmp_path / "out")}
    assert set(rec) == {"full", "recall:k=2,m=4,sinks=2,w=16"}
    assert rec["recall:k=2,m=4,sinks=2,w=16"]["placement"] == "store=disk"  # the first given ran: noted, not keyed
    assert "placement" not in rec["full"]
    again = run_grid(grid(recipes=[base], lengths=[400], depths=[0], options={"max_new_tokens": 2}),
                     tmp_path / "out", pair=pair, progress=False)
    assert (again["ran"], again["skipped"]) == (0, 2)
