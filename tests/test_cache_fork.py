"""Forking a prefilled cache (kvslim.cache.fork): forks continue exactly like fresh caches, never affect each other or
the parent, share recall's cold rows read-only and count them once."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvslim
from kvslim.cache import make_cache
from kvslim.cache.fork import SharedColdStream, family_nbytes, fork_cache
from kvslim.testing import tiny_gemma3, tiny_llama

LOSSLESS_RECALL = "recall:m=4,k=0,w=16,sinks=2"  # every block fetched: lossless below 256 tokens
# the same through a lossy path (top-2 blocks, fp8 cold rows); compared only against itself, bit for bit
LOSSY_RECALL = "recall:m=4,k=2,w=8,sinks=2,cold=fp8,pin=1"
RECIPES = ["full", LOSSLESS_RECALL, f"{LOSSLESS_RECALL},store=disk", LOSSY_RECALL, "snapkv:keep=0.5"]


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "gemma3": tiny_gemma3()}


def _ids(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


CONTEXT, QA, QB = _ids(90, 1), _ids(7, 2), _ids(9, 3)


def _run(model, cache, ids, steps=10):
    """Feed ``ids`` in one call, then ``steps`` greedy tokens one by one: (tokens, logits of every step)."""
    logits, toks = [], []
    with torch.inference_mode():
        out = model(ids, cache=cache, use_cache=True).logits[0, -1]
        for _ in range(steps):
            logits.append(out)
            tok = int(out.argmax())
            toks.append(tok)
            out = model(torch.tensor([[tok]]), cache=cache, use_cache=True).logits[0, -1]
    return toks, torch.stack(logits)


def _prefilled(model, recipe):
    cache = DynamicCache(config=model.config) if recipe == "dynamic" else make_cache(model, recipe)
    with torch.inference_mode():
        model(CONTEXT, cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_a_fork_continues_exactly_like_a_fresh_cache(models, arch, recipe):
    model = models[arch]
    parent = _prefilled(model, recipe)
    fa, fb = parent.fork(), fork_cache(parent)
    got_b = _run(model, fb, QB)  # B first: the order of the forks does not matter
    got_a = _run(model, fa, QA)
    got_p = _run(model, parent, QA)  # the parent continues too, after its forks did
    for q, got in ((QA, got_a), (QB, got_b), (QA, got_p)):
        want = _run(model, _prefilled(model, recipe), q)
        assert got[0] == want[0]
        assert torch.equal(got[1], want[1])  # bit for bit: the same calls on the same rows


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("recipe", ["full", LOSSLESS_RECALL])
def test_lossless_fork_gives_the_tokens_of_one_prefill_of_context_and_question(models, arch, recipe):
    model = models[arch]
    fork = _prefilled(model, recipe).fork()
    got = _run(model, fork, QB)
    want = _run(model, DynamicCache(config=model.config), torch.cat([CONTEXT, QB], 1))
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


def test_a_fork_of_a_fork_and_closing_the_parent(models):
    model = models["llama"]
    parent = _prefilled(model, LOSSLESS_RECALL)
    child = parent.fork()
    _run(model, child, QA, steps=3)
    grandchild = child.fork()
    parent.close()  # the shared rows stay readable while a fork reads them
    del parent
    got = _run(model, grandchild, QB)
    fresh = _prefilled(model, LOSSLESS_RECALL)
    _run(model, fresh, QA, steps=3)
    assert torch.equal(got[1], _run(model, fresh, QB)[1])


def _frozen_rows(cache):
    return [(s, s.rows[: n].clone()) for layer in cache.layers if hasattr(layer, "cold_k")
            for w in (layer.cold_k, layer.cold_v) for s, n, _c in w.parts]  # fmt: skip


def test_shared_rows_are_never_written(models):
    model = models["llama"]
    parent = _prefilled(model, LOSSLESS_RECALL)
    n0 = parent.layers[0].cold_k.n
    forks = [parent.fork() for _ in range(3)]
    frozen = _frozen_rows(parent)
    assert frozen and all(isinstance(layer.cold_k, SharedColdStream) for layer in parent.layers)
    for i, c in enumerate([parent, *forks]):
        _run(model, c, _ids(30, 10 + i))  # enough new tokens that blocks leave the window into the cold tier
        assert c.layers[0].cold_k.n > n0
    for s, rows in frozen:
        assert s.n == n0 and torch.equal(s.rows[:n0], rows)  # the frozen parts did not grow or change
    forks[0].batch_repeat_interleave(2)  # batch reordering copies the rows into the fork first
    forks[0].batch_select_indices(torch.tensor([1]))
    for s, rows in frozen:
        assert torch.equal(s.rows[:n0], rows)


def test_shared_cold_bytes_are_counted_once(models):
    model = models["llama"]
    parent = _prefilled(model, LOSSLESS_RECALL)
    before = parent.tier_nbytes()
    assert before["cold"] > 0 and "cold_shared" not in before
    forks = [parent.fork(), parent.fork()]
    assert parent.tier_nbytes() == before  # the parent keeps counting the shared rows
    for f in forks:
        t = f.tier_nbytes()
        assert t["cold"] == 0 and t["cold_shared"] == before["cold"]  # a fork counts only its own rows
        assert t["hot"] == before["hot"]  # the hot tier is copied
    for i, c in enumerate([parent, *forks]):
        _run(model, c, _ids(20 + 8 * i, 20 + i))
    tiers = [c.tier_nbytes() for c in (parent, *forks)]
    own = [t["cold"] for t in tiers]
    assert own[0] > before["cold"] and all(o > 0 for o in own[1:])
    fam = family_nbytes([parent, *forks])
    assert fam["cold"] == sum(own)  # summing tier_nbytes over a family counts each shared row once
    assert fam["hot"] == sum(t["hot"] for t in tiers)
    # without the parent, the shared rows still count once (by identity of the rows read)
    assert family_nbytes(forks)["cold"] == before["cold"] + own[1] + own[2]
    # each cache reads its shared and own rows: what a fresh cache fed the same tokens holds
    fresh = _prefilled(model, LOSSLESS_RECALL)
    _run(model, fresh, _ids(28, 21))
    assert tiers[1]["cold"] + tiers[1]["cold_shared"] == fresh.tier_nbytes()["cold"]


def test_forking_other_caches_deep_copies(models):
    model = models["llama"]
    dyn = _prefilled(model, "dynamic")
    fork = kvslim.fork_cache(dyn)
    assert isinstance(fork, DynamicCache) and fork.get_seq_length() == dyn.get_seq_length()
    assert torch.equal(_run(model, fork, QA)[1], _run(model, dyn, QA)[1])
    empty = make_cache(model, LOSSLESS_RECALL).fork()  # nothing held yet: a plain copy
    assert torch.equal(_run(model, empty, CONTEXT)[1], _run(model, make_cache(model, LOSSLESS_RECALL), CONTEXT)[1])


@pytest.mark.parametrize("recipe", ["full", LOSSLESS_RECALL, LOSSY_RECALL])
def test_generate_continues_forks_of_a_prefilled_context(recipe):
    from kvslim.eval.harness.tiny import tiny_pair

    model, tok = tiny_pair("tiny-llama")
    doc = "The pass key is 48213. " + "The grass is green. " * 12
    cache = kvslim.prefill(model, tok, doc, cache=make_cache(model, recipe))
    for q in ("What is the pass key?", "What colour is the grass?"):
        got = kvslim.generate(model, tok, q, cache=cache.fork(), context=doc, continue_cache=True, max_new_tokens=12)
        want = kvslim.generate(model, tok, q, cache=make_cache(model, recipe), context=doc, max_new_tokens=12)
        assert got.text == want.text and got.new_tokens == want.new_tokens and got.prompt_tokens == want.prompt_tokens
    with pytest.raises(kvslim.InvalidInput, match="exactly that context"):
        kvslim.generate(model, tok, "Why?", cache=cache.fork(), context=doc + " More.", continue_cache=True)
    with pytest.raises(kvslim.InvalidInput, match="empty cache"):
        kvslim.prefill(model, tok, doc, cache=cache)


def test_the_last_cache_to_close_releases_the_shared_cold_files(models, tmp_path):
    """store=disk: the frozen rows' files stay while a fork reads them and go with the last close()."""
    model = models["llama"]
    parent = _prefilled(model, f"{LOSSLESS_RECALL},store=disk")
    first = parent.layers[0].cold_k
    folder = first.tier.folder
    a, b = parent.fork(), parent.fork()
    frozen = [s for s, _n, _c in parent.layers[0].cold_k.parts]
    assert frozen == [first] and first.fork_readers == 3 and folder.is_dir()
    parent.close()
    a.close()
    assert not first.closed and folder.is_dir()
    got = _run(model, b, QA, steps=3)  # still readable by the last fork
    fresh = _prefilled(model, LOSSLESS_RECALL)
    assert torch.equal(got[1], _run(model, fresh, QA, steps=3)[1])
    b.close()
    assert first.closed and not folder.exists()  # the temporary folder went with the last reader
    b.close()  # twice: harmless
