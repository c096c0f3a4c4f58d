"""recall: lossless at k >= blocks, chunk invariance, batches with padding, exact tier accounting, cold faults."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DynamicCache

from kvslim.cache import compressed, make_cache
from kvslim.cache.build import predict_nbytes
from kvslim.cache.method import ModelShape
from kvslim.errors import ColdTierError, InvalidInput
from kvslim.testing import tiny_gemma3, tiny_llama

SMALL = "m=4,w=8,sinks=2"  # 45-token prompts leave several blocks cold


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "gemma3": tiny_gemma3()}


def _greedy(model, ids, cache, n=20, mask=None):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache=cache, pad_token_id=0)


def _ids(n=45, b=1, seed=1):
    return torch.randint(1, 128, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "opts",
    [
        f"{SMALL},k=0",
        f"{SMALL},k=100,store=disk",
        f"{SMALL},k=100,prefill=select",
        f"{SMALL},k=100,summary=mean,gqa=sum",
        f"{SMALL},k=100,summary=reps,r=3,nbr=1",
        f"{SMALL},k=100,gqa=union,prefill=select",
    ],
)
def test_lossless_when_every_block_is_fetched(models, arch, opts):
    model = models[arch]
    ids = _ids()
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    with compressed(model, f"recall:{opts}") as cache:
        out = _greedy(model, ids, cache)
        tiers = cache.tier_nbytes()
        assert tiers["cold"] > 0 and tiers["fetched"] > 0
    assert torch.equal(out, ref), opts


def _logits(model, cache, ids, chunks):
    outs = []
    with torch.inference_mode():
        a = 0
        for c in chunks:
            outs.append(model(ids[:, a : a + c], cache=cache, use_cache=True).logits)
            a += c
    return torch.cat(outs, 1)


@pytest.mark.parametrize("prefill", ["dense", "select"])
def test_one_shot_equals_chunked_and_token_by_token(models, prefill):
    model = models["llama"]
    ids = _ids(60)
    recipe = f"recall:{SMALL},k=2,prefill={prefill}+fp8"
    with compressed(model, recipe) as c1:
        one = _logits(model, c1, ids, [60])
        hot, cold = c1.nbytes(), c1.tier_nbytes()["cold"]
    with compressed(model, recipe) as c2:
        chunked = _logits(model, c2, ids, [17, 1, 30, 12])
        assert (c2.nbytes(), c2.tier_nbytes()["cold"]) == (hot, cold)
    with compressed(model, recipe) as c3:
        steps = _logits(model, c3, ids, [1] * 60) if prefill == "select" else None
    assert torch.allclose(one, chunked, atol=1e-4)
    if steps is not None:  # prefill=select follows the decode rule for every query
        assert torch.allclose(one, steps, atol=1e-4)


def test_selection_changes_the_answer_only_through_k(models):
    """k=1 attends less than k=all (different logits), and fetches exactly k blocks of m tokens per head."""
    model = models["llama"]
    ids = _ids(60)
    with compressed(model, f"recall:{SMALL},k=1") as c:
        few = _logits(model, c, ids, [59, 1])
        t = c.tier_nbytes()
        # 2 layers x 2 KV heads x 4 tokens x (K + V) x 16 dims x 4 bytes
        assert t["fetched"] == 2 * 2 * 4 * 2 * 16 * 4
        assert [layer.fetched_tokens for layer in c.layers] == [4, 4]
    with compressed(model, f"recall:{SMALL},k=100") as c:
        allb = _logits(model, c, ids, [59, 1])
    assert torch.allclose(few[:, :59], allb[:, :59], atol=1e-5)  # dense prefill
    assert not torch.allclose(few[:, 59], allb[:, 59], atol=1e-4)


def test_hot_and_cold_bytes_are_exact(models):
    model = models["llama"]
    ids = _ids(45)
    with compressed(model, f"recall:{SMALL},k=2,summary=bbox") as c:
        _logits(model, c, ids, [45])
        n_blocks = (45 - 8 + 1 - 2) // 4  # blocks out of the window of the next query: n_out(45) = 9
        exact = 45 - n_blocks * 4
        per_layer_hot = 2 * (2 * exact * 16 * 4) + 2 * n_blocks * 2 * 16 * 4 + exact + n_blocks
        assert c.nbytes() == 2 * per_layer_hot
        assert c.tier_nbytes()["cold"] == 2 * 2 * 2 * n_blocks * 4 * 16 * 4
        shape = ModelShape.from_model(model)
        for recipe in (f"recall:{SMALL},k=2,summary=bbox", f"recall:{SMALL},k=2,summary=reps,r=3+fp8"):
            with compressed(model, recipe) as c2:
                _logits(model, c2, ids, [45])
                measured = [layer.nbytes(include_codec_state=False) for layer in c2.layers]
                assert measured == predict_nbytes(shape, recipe, 45)
                pred = c2.layers[0].predict(c2.layers[0].spec, 46, shape)
                _logits(model, c2, ids[:, :1], [1])
                assert pred["fetched"] == c2.layers[0].tier_nbytes()["fetched"]
                assert pred["cold"] == c2.layers[0].tier_nbytes()["cold"]


def test_batch_of_two_left_padded(models):
    model = models["llama"]
    ids = _ids(40, b=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    ref = _greedy(model, ids, DynamicCache(config=model.config), mask=mask)
    with compressed(model, f"recall:{SMALL},k=100") as cache:
        out = _greedy(model, ids, cache, mask=mask)
    assert torch.equal(out, ref)


def test_bad_parameters_refused_before_allocation(models, tmp_path):
    model = models["llama"]
    for bad in ("recall:summary=box", "recall:r=0", "recall:cold=kivi2", "recall:cold=tq2.5", "recall:store=tape", "recall:dir=/x",
                "recall:prefill=sparse"):  # fmt: skip
        with pytest.raises(InvalidInput):
            make_cache(model, bad)
    with pytest.raises(InvalidInput, match="does not exist"):
        make_cache(model, f"recall:store=disk,dir={tmp_path}/missing")


def test_deleted_cold_file_fails_loudly(models, tmp_path):
    model = models["llama"]
    ids = _ids(45)
    with compressed(model, f"recall:{SMALL},k=2,store=disk,dir={tmp_path}") as cache:
        _logits(model, cache, ids, [45])
        files = sorted(tmp_path.glob("*.cold"))
        assert len(files) == 4  # 2 layers x (K, V)
        os.unlink(files[0])
        with pytest.raises(ColdTierError, match=str(files[0])):
            _logits(model, cache, ids[:, :1], [1])
        cache.close()
    assert not list(tmp_path.glob("*.cold"))


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_deep_copy_continues_like_the_original(models, store):
    """The niah harness scores answers on a deep copy of the prefilled cache."""
    import copy

    model = models["llama"]
    ids = _ids(50)
    with compressed(model, f"recall:{SMALL},k=2,store={store}") as cache:
        _logits(model, cache, ids[:, :45], [45])
        twin = copy.deepcopy(cache)
        a = _logits(model, twin, ids[:, 45:], [1] * 5)
        b = _logits(model, cache, ids[:, 45:], [1] * 5)
        assert torch.equal(a, b)
        assert twin.tier_nbytes()["cold"] == cache.tier_nbytes()["cold"] > 0


def test_block_lse_is_the_exact_per_block_attention():
    from kvslim.cache.methods.recall.segments import block_lse

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 1, 8, generator=g), torch.randn(2, 3, 12, 8, generator=g)  # 3 KV heads x 2 query heads
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False  # row 1: block 0 has no valid token, block 1 one
    got = block_lse(q, k, valid, 4, 0.5)
    for b in range(2):
        for h in range(3):
            for j in range(3):
                keys = [t for t in range(4 * j, 4 * j + 4) if valid[b, t]]
                want = max((torch.logsumexp(0.5 * k[b, h, keys] @ q[b, 2 * h + i, 0], 0) if keys else
                            torch.tensor(float("-inf"))) for i in range(2))  # fmt: skip
                assert torch.allclose(got[b, h, j], want, atol=1e-5), (b, h, j)


def test_pinned_blocks_are_fetched_and_chunking_keeps_them(models):
    """pin=P: the prefill's last query pins P blocks per KV head (exact block log-sum-exp); every decode step fetches
    them; one-shot and chunked prefill pin the same blocks; a later multi-token call re-pins; bytes = predict."""
    model = models["llama"]
    ids = _ids(60)
    recipe = f"recall:{SMALL},k=2,pin=2"
    with compressed(model, recipe) as c1, compressed(model, recipe) as c2, compressed(model, recipe) as c3:
        one = _logits(model, c1, ids[:, :50], [50])
        chunked = _logits(model, c2, ids[:, :50], [23, 27])
        assert torch.allclose(one, chunked, atol=1e-4)
        layer = c1.layers[0]
        assert bool(layer.pin_ok.all()) and torch.equal(layer.pinned, c2.layers[0].pinned)
        assert int(layer.pinned.max()) < layer.n_blocks
        rows = []
        fetch = layer.cold_k.fetch
        layer.cold_k.fetch = lambda idx: rows.append(idx.clone()) or fetch(idx)  # record what the step fetches
        _logits(model, c1, ids[:, 50:51], [1])
        assert [sorted(set((rows[0][0, h] // 4).tolist())) for h in range(2)] == [sorted(layer.pinned[0, h].tolist()) for h in range(2)]
        shape = ModelShape.from_model(model)
        assert [x.nbytes(include_codec_state=False) for x in c1.layers] == predict_nbytes(shape, recipe, 51)
        _logits(model, c2, ids[:, 50:], [10])  # a later multi-token call re-pins from its own last query
        _logits(model, c3, ids, [60])
        assert all(torch.equal(a.pinned, b.pinned) for a, b in zip(c2.layers, c3.layers, strict=True))


def test_span_fetches_each_pinned_block_and_the_next(models):
    """span=2: a decode step fetches every pinned block and the block after it (where that is out of the window),
    then fills the rest of k by score."""
    model = models["llama"]
    ids = _ids(60)
    with compressed(model, f"recall:{SMALL},k=5,pin=2,span=2") as c:
        _logits(model, c, ids[:, :50], [50])
        layer = c.layers[0]
        rows = []
        fetch = layer.cold_k.fetch
        layer.cold_k.fetch = lambda idx: rows.append(idx.clone()) or fetch(idx)
        _logits(model, c, ids[:, 50:51], [1])
        nt = layer.n_out(layer.seen - 1)
        for h in range(2):
            got = set((rows[0][0, h] // 4).tolist())
            want = {j + o for j in layer.pinned[0, h].tolist() for o in (0, 1) if j + o < nt}
            assert want <= got and len(got) == 5, (h, want, got)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rest_mean_with_one_token_blocks_is_exact(models, arch):
    """rest=mean: a block not fetched enters as its mean key/value with log(count) on the logit. With m=1 a block's
    mean is its token, so k=1 attends to every token exactly: logits equal the uncompressed cache's."""
    model = models[arch]
    ids = _ids(40)
    with torch.inference_mode():
        ref = model(ids[:, :39], cache=DynamicCache(config=model.config), use_cache=True)
        ref = model(ids[:, 39:], cache=ref.past_key_values, use_cache=True).logits
    recipe = "recall:m=1,k=1,w=8,sinks=2,rest=mean"
    with compressed(model, recipe) as c:
        got = _logits(model, c, ids, [39, 1])[:, 39:]
        assert [x.nbytes(include_codec_state=False) for x in c.layers] == predict_nbytes(ModelShape.from_model(model), recipe, 40)
    with compressed(model, "recall:m=1,k=1,w=8,sinks=2") as c:
        without = _logits(model, c, ids, [39, 1])[:, 39:]
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(without, ref, atol=1e-3)  # leaving the other blocks out does change the step


def test_rest_mean_changes_nothing_when_every_block_is_fetched(models):
    model = models["llama"]
    ids = _ids(45)
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    with compressed(model, f"recall:{SMALL},k=100,rest=mean+fp8") as c:
        assert torch.equal(_greedy(model, ids, c), _greedy(model, ids, make_cache(model, f"recall:{SMALL},k=100+fp8")))
    with compressed(model, f"recall:{SMALL},k=100,rest=mean") as c:
        assert torch.equal(_greedy(model, ids, c), ref)
    with pytest.raises(InvalidInput, match="rest=mean needs prefill=dense"):
        make_cache(model, "recall:rest=mean,prefill=select")


def test_pin_needs_dense_prefill_and_at_most_k(models):
    for bad in ("recall:k=2,pin=3", "recall:pin=2,prefill=select", "recall:k=4,pin=3,span=2"):
        with pytest.raises(InvalidInput, match="pin="):
            make_cache(models["llama"], bad)
    with pytest.raises(InvalidInput, match="span=2 extends pinned blocks"):
        make_cache(models["llama"], "recall:pin=0,span=2")  # (without pin=: auto pins, span 2 allowed)


def test_pinw_ranks_window_blocks_too_and_a_pin_waits_for_its_block(models):
    """pinw=1 (issue 24, part 4): pins are ranked over every whole block, those still in the window too (a needle
    near the prompt's end that leaves the window while the answer is decoded); such a pin is inert until its block
    leaves the window, then fetched. Slots, hot bytes and fetched bytes are those of pinw=0; chunking pins alike."""
    model = models["llama"]
    ids = _ids(60)
    recipe = f"recall:{SMALL},k=2,pin=2,pinw=1"
    shape = ModelShape.from_model(model)
    with compressed(model, recipe) as c1, compressed(model, recipe) as c2, compressed(model, f"recall:{SMALL},k=2,pin=2") as c0:
        one = _logits(model, c1, ids[:, :50], [50])
        assert torch.allclose(one, _logits(model, c2, ids[:, :50], [23, 27]), atol=1e-4)
        _logits(model, c0, ids[:, :50], [50])
        layers = c1.layers
        assert all(torch.equal(a.pinned, b.pinned) for a, b in zip(layers, c2.layers, strict=True))
        whole = (layers[0].seen - layers[0].spec.sinks) // layers[0].m
        assert all(int(x.pinned.max()) < whole and x.pinned.shape == y.pinned.shape for x, y in zip(layers, c0.layers, strict=True))
        assert [x.nbytes() for x in layers] == [x.nbytes() for x in c0.layers]
        in_window = [(i, h, j) for i, x in enumerate(layers) for h in range(x.heads) for j in x.pinned[0, h].tolist() if j >= x.n_blocks]
        assert in_window, "the last query attends a block still in the window in some (layer, head): the case tested"
        i, h, j = in_window[0]
        layer, rows = layers[i], []
        fetch = layer.cold_k.fetch
        layer.cold_k.fetch = lambda idx: rows.append(idx.clone()) or fetch(idx)
        for t in range(50, 60):  # decode until block j has left the window
            _logits(model, c1, ids[:, t : t + 1], [1])
            nt = layer.n_out(layer.seen - 1)
            blocks = set((rows[-1][0, h] // layer.m).tolist())
            assert max(blocks) < nt and (j in blocks) == (j < nt), (t, j, nt, blocks)
        assert j < layer.n_out(layer.seen - 1), "the pinned block left the window within 10 steps"
        assert [x.nbytes(include_codec_state=False) for x in c1.layers] == predict_nbytes(shape, recipe, 60)
    with pytest.raises(InvalidInput, match="pinw=1"):
        make_cache(model, "recall:pin=0,pinw=1")


def test_hold_keeps_the_blocks_the_last_query_attended_most(models):
    """hold=H (issue 24, part 4): H blocks per KV head are held for the next decode step, which fetches them before
    any block chosen by summary: after a multi-token call the H best out of the window by its last query's exact
    block log-sum-exp (the pins and their spans aside), after a decode step the H fetched blocks (pins aside) its
    query attended most (per KV head the largest over its query heads of the exact log-sum-exp over each block's
    tokens). Fetched bytes per step are those of the same k without hold; hot bytes = predict (H indices per KV
    head); a later multi-token call holds what a one-shot prefill of the same tokens holds."""
    from kvslim.cache.methods.recall.segments import block_lse

    model = models["llama"]
    ids = _ids(70)
    recipe = f"recall:{SMALL},k=4,pin=1,hold=2"
    shape = ModelShape.from_model(model)

    def top_held(layer, lse, exclude):  # the 2 best blocks per KV head, those in `exclude` aside
        return [sorted(sorted((j for j in lse[h] if j not in exclude[h]), key=lambda j: -lse[h][j])[:2])
                for h in range(layer.heads)]  # fmt: skip

    def held(layer):
        return [sorted(j for j, ok in zip(layer.held[0, h].tolist(), layer.held_ok[0, h].tolist(), strict=True) if ok)
                for h in range(layer.heads)]  # fmt: skip

    with compressed(model, recipe) as c, compressed(model, f"recall:{SMALL},k=4,pin=1") as c0, \
            compressed(model, recipe) as c3:  # fmt: skip
        layer = c.layers[0]
        last = []
        pin = layer._pin
        layer._pin = lambda q, *a: last.append(q.clone()) or pin(q, *a)
        _logits(model, c, ids[:, :50], [50])
        _logits(model, c0, ids[:, :50], [50])
        nb, m = layer.n_blocks, layer.m
        lse = block_lse(last[0], layer.cold_k.read(0, nb * m), None, m, layer.dim**-0.5)[0]  # [h, nb]
        pins = [set(layer.pinned[0, h].tolist()) for h in range(layer.heads)]
        assert held(layer) == top_held(layer, [dict(enumerate(lse[h].tolist())) for h in range(layer.heads)], pins)
        fetched, queries = [], []
        fetch = layer.cold_k.fetch
        layer.cold_k.fetch = lambda idx: fetched.append(idx.clone()) or fetch(idx)
        attend = layer._decode_segments
        layer._decode_segments = lambda q, *a: queries.append(q.clone()) or attend(q, *a)
        g = layer.heads and model.config.num_attention_heads // layer.heads
        for t in range(50, 56):
            before = held(layer)
            _logits(model, c, ids[:, t : t + 1], [1])
            _logits(model, c0, ids[:, t : t + 1], [1])
            assert c.tier_nbytes()["fetched"] == c0.tier_nbytes()["fetched"]
            blocks = [set((fetched[-1][0, h] // m).tolist()) for h in range(layer.heads)]
            assert all(set(before[h]) <= blocks[h] for h in range(layer.heads)), t  # what was held is fetched now
            q, keys = queries[-1], layer.cold_k.read(0, layer.n_blocks * m)
            lse = [{j: max(float(torch.logsumexp(keys[0, h, j * m : j * m + m].float() @ q[0, h * g + i, 0].float()
                                                 * layer.dim**-0.5, 0)) for i in range(g)) for j in blocks[h]}
                   for h in range(layer.heads)]  # fmt: skip
            assert held(layer) == top_held(layer, lse, pins), t
        assert [x.nbytes(include_codec_state=False) for x in c.layers] == predict_nbytes(shape, recipe, 56)
        _logits(model, c, ids[:, 56:], [14])  # a new prompt holds from its own last query
        _logits(model, c3, ids, [70])
        assert all(torch.equal(a.held, b.held) and torch.equal(a.held_ok, b.held_ok)
                   for a, b in zip(c.layers, c3.layers, strict=True))  # fmt: skip
    for bad in ("recall:k=4,pin=1,span=2,hold=3", "recall:k=0,hold=1"):
        with pytest.raises(InvalidInput, match="hold="):
            make_cache(model, bad)


def test_hold_is_lossless_with_every_block_fetched(models):
    model = models["llama"]
    ids = _ids(45)
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    with compressed(model, f"recall:{SMALL},k=100,pin=2,hold=2") as c:
        assert torch.equal(_greedy(model, ids, c), ref)
