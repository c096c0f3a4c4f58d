"""``--prefill-chunk``: chunk-invariant recipes fed in chunks give the one-call records; the others are refused."""

from __future__ import annotations

import pytest

from kvslim.errors import InvalidInput
from kvslim.eval.harness.engine import PrefillPlan, prefill, prefill_chunks
from kvslim.eval.harness.runner import Grid, run_grid
from kvslim.eval.harness.store import ResultStore
from kvslim.eval.harness.tiny import tiny_pair


def records(out):
    return {(r["recipe"], r["length"], r["depth"], r["seed"]): r for r in ResultStore(out).records()}


def test_prefill_chunks_cover_the_range_once():
    assert prefill_chunks(0, 10) == [(0, 10)]  # unset: one call
    assert prefill_chunks(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_chunks(3, 7, 4) == [(3, 7)]
    assert PrefillPlan(chunk=4).calls(5, 5 + 12) == [(5, 9), (9, 13), (13, 17)]
    assert prefill_chunks(0, 10) == [(0, 10)]  # reset after the block


def test_prefill_calls_the_model_per_chunk():
    model, _ = tiny_pair("tiny-gemma3")
    from transformers import DynamicCache

    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        ids = list(range(5, 105))
        one = prefill(model, ids, DynamicCache(config=model.config))
        assert calls == [100]
        calls.clear()
        many = prefill(model, ids, DynamicCache(config=model.config), split=70, plan=PrefillPlan(chunk=32))
        assert calls == [32, 32, 6, 30]  # the context in chunks, then the question: no chunk crosses the split
        assert many.n_tokens == one.n_tokens == 100
        assert (many.last_logits - one.last_logits).abs().max() < 1e-4
    finally:
        hook.remove()


@pytest.mark.parametrize("name,task,batch,options,recipes", [
    ("tiny-gemma3", "niah_multivalue", 1, {}, ["full"]),  # sliding-window layers: the case the option is for
    ("tiny-gemma3", "niah_single_1", 3, {}, ["full"]),  # batched prefill is chunked too
    ("tiny-llama", "passkey", 1, {"agnostic": True}, ["full"]),  # context chunked before the question
    ("tiny-gemma3", "passkey", 1, {}, ["recall:m=4,k=2,w=16,sinks=2+fp8", "window:w=64"]),  # chunk-invariant caches
])
def test_chunked_records_equal_one_call(tmp_path, name, task, batch, options, recipes):
    pair = tiny_pair(name)
    g = Grid(task=task, model=name, recipes=recipes, lengths=[700], depths=[0, 0.5, 1], seeds=[0],
             options={"max_new_tokens": 6, **options})
    run_grid(g, tmp_path / "one", pair=pair, progress=False)
    run_grid(g, tmp_path / "chunked", pair=pair, progress=False, prefill_chunk=128, batch=batch)
    one, chunked = records(tmp_path / "one"), records(tmp_path / "chunked")
    assert len(one) == len(chunked) == 3 * len(set(["full", *recipes]))
    for key, a in one.items():
        b = chunked[key]
        assert "prefill_chunk" not in a and b["prefill_chunk"] == 128
        for field in ("answer", "success", "retrieved", "kv_bytes", "prompt_hash", "cold_bytes", "fetched_bytes"):
            assert a.get(field) == b.get(field), (key, field)
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)


@pytest.mark.parametrize("chunk,recipes,match", [
    (-1, ["full"], "--prefill-chunk"),
    (64, ["full", "window:w=64", "snapkv:keep=0.5"], "'snapkv:keep=0.5' does not"),  # evicts per call
    (64, ["full", "full-kivi2"], "kivi2' does not"),  # KIVI groups tokens
])
def test_bad_prefill_chunk_refused_before_anything_is_written(tmp_path, chunk, recipes, match):
    g = Grid(task="passkey", model="tiny-llama", recipes=recipes, lengths=[300])
    with pytest.raises(InvalidInput, match=match):
        run_grid(g, tmp_path / "out", pair=tiny_pair("tiny-llama"), progress=False, prefill_chunk=chunk)
    assert not (tmp_path / "out").exists()


def test_ruler_docs_say_how_cells_were_prefilled():
    from kvslim.eval.reports.ruler_docs import prefill_lines

    one = {"length": 8000}
    chunked = {"length": 8000, "prefill_chunk": 512}
    assert prefill_lines({"a": [one, one]}, [8000]) == []  # every cell in one call: nothing to say
    line = prefill_lines({"a": [one, chunked], "b": [chunked, {"length": 1000}]}, [1000, 8000])[0]
    assert "1000 tokens: 1 in one call; 8000 tokens: 1 in one call, 2 in 512-token chunks." in line


def test_chunk_where_invariant_chunks_only_those_recipes(tmp_path):
    pair = tiny_pair("tiny-gemma3")
    recipes = ["window:w=64", "snapkv:keep=0.5", "full-kivi2"]
    g = Grid(task="passkey", model="tiny-gemma3", recipes=recipes, lengths=[600], depths=[0.5], seeds=[0],
             options={"max_new_tokens": 6, "agnostic": True})
    run_grid(g, tmp_path / "one", pair=pair, progress=False)
    run_grid(g, tmp_path / "mixed", pair=pair, progress=False, prefill_chunk=128, chunk_where_invariant=True)
    one, mixed = records(tmp_path / "one"), records(tmp_path / "mixed")
    chunked = {k[0] for k, r in mixed.items() if r.get("prefill_chunk") == 128}
    assert chunked == {"full", "window:w=64"}
    for key, a in one.items():
        b = mixed[key]
        if key[0] in chunked:
            assert a["answer"] == b["answer"] and a["kv_bytes"] == b["kv_bytes"]
        else:  # one call, as without chunking: the very same record
            a, b = dict(a), dict(b)
            a.pop("seconds"), b.pop("seconds")
            assert a == b, key


def test_no_prefill_call_holds_a_lone_last_token():
    # issue 25, 3.5: a chunk size leaving a one-token last call gave recall's dense prefill a decode step
    assert prefill_chunks(0, 9, 4) == [(0, 4), (4, 9)]  # the lone 9th token joins the call before it
    assert prefill_chunks(0, 5, 4) == [(0, 5)]
    assert prefill_chunks(3, 8, 4) == [(3, 8)]
    assert prefill_chunks(0, 800, 799) == [(0, 800)]
    assert prefill_chunks(0, 3, 1) == [(0, 1), (1, 2), (2, 3)]  # every call one token: nothing to merge (refused for recipes that mind, below)


RECALL_DENSE = "recall:m=4,k=2,w=16,sinks=2+fp8"


def test_recall_dense_with_a_one_token_tail_equals_one_call(tmp_path):
    # issue 25, 3.5: `--prefill-chunk 799` on an 800-token prompt fed recall's dense prefill a one-token last call,
    # a decode step, and the record (claiming a chunk-invariant run) differed from one call's. Now that chunk
    # joins the call before it: the prompt goes in one call, so the records are the very same.
    pair = tiny_pair("tiny-llama")
    g = Grid(task="passkey", model="tiny-llama", recipes=[RECALL_DENSE], lengths=[400], depths=[0], seeds=[0],
             options={"max_new_tokens": 4})
    run_grid(g, tmp_path / "one", pair=pair, progress=False)
    (a,) = [r for r in ResultStore(tmp_path / "one").records() if r["recipe"] != "full"]
    run_grid(g, tmp_path / "tail", pair=pair, progress=False, prefill_chunk=a["prompt_tokens"] - 1)
    (b,) = [r for r in ResultStore(tmp_path / "tail").records() if r["recipe"] != "full"]
    assert b["prefill_chunk"] == a["prompt_tokens"] - 1
    for field in ("logprob", "answer", "kv_bytes", "cold_bytes", "fetched_bytes"):
        assert a[field] == b[field], field


def test_one_token_chunks_refused_for_recall_dense_only(tmp_path):
    # issue 25, 3.5: --prefill-chunk 1 made every prefill call a decode step for recall's dense prefill
    pair = tiny_pair("tiny-llama")
    g = Grid(task="passkey", model="tiny-llama", recipes=[RECALL_DENSE], lengths=[400], depths=[0], seeds=[0],
             options={"max_new_tokens": 2})
    with pytest.raises(InvalidInput, match="--prefill-chunk 1 makes every prefill call one token.*2 or more"):
        run_grid(g, tmp_path / "out", pair=pair, progress=False, prefill_chunk=1)
    assert not (tmp_path / "out").exists()
    from kvslim.cache.recipe import chunk_invariant

    assert chunk_invariant(RECALL_DENSE) and chunk_invariant(RECALL_DENSE, 2) and not chunk_invariant(RECALL_DENSE, 1)
    assert chunk_invariant("recall:m=4,k=2,w=16,sinks=2,prefill=select", 1) and chunk_invariant("v4+tq3", 1)
    # with chunk_where_invariant the recipe runs in one call, and its record says so (no prefill_chunk)
    run_grid(g, tmp_path / "mixed", pair=pair, progress=False, prefill_chunk=1, chunk_where_invariant=True)
    recs = {r["recipe"]: r for r in ResultStore(tmp_path / "mixed").records()}
    assert recs["full"]["prefill_chunk"] == 1 and "prefill_chunk" not in recs["recall:k=2,m=4,sinks=2,w=16+fp8"]


def test_the_plan_is_decided_per_recipe_and_travels_in_signatures():
    from pathlib import Path

    import kvslim.eval
    from kvslim.eval.harness.caches import prefill_plan

    assert prefill_plan("window:w=64", None, 64, where_invariant=True).chunk == 64
    assert prefill_plan("snapkv:keep=0.5", None, 64, where_invariant=True).chunk == 0  # one call instead
    assert prefill_plan(RECALL_DENSE, None, 1, where_invariant=True).chunk == 0
    assert prefill_plan("window:w=64", None, 64).chunk == 64
    # no ambient channel: the harness, the tasks and the reports set or read no ContextVar
    root = Path(kvslim.eval.__file__).parent
    assert not [p for p in root.rglob("*.py") if "ContextVar" in p.read_text()]
