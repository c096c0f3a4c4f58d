"""The eviction baselines' cache layer: lossless at keep=1, evicted tokens gone, bytes as predicted, bad input refused."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from kvslim import make_cache
from kvslim.cache.build import predict_nbytes
from kvslim.cache.method import ModelShape
from kvslim.cache.methods.evict.layer import EvictLayer, kept_tokens
from kvslim.cache.recipe import parse_recipe
from kvslim.errors import InvalidInput
from kvslim.eval.harness.tiny import tiny_pair
from kvslim.formats import vectors_nbytes

BASELINES = ("streaming", "snapkv", "tova", "h2o", "knorm")


def make_evict_cache(model, text):
    return make_cache(model, text)


def parse_baseline(text):
    r = parse_recipe(text)
    return r.method.policy(), r.codec


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def pair(request):
    return tiny_pair(request.param)


def _ids(n: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (b, n), generator=g)


def _gen(model, ids, cache, n=10, mask=None):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache=cache,
                              pad_token_id=0)


def _evict_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, EvictLayer)]


@pytest.mark.parametrize("name", list(BASELINES))
def test_keep_one_is_token_identical_to_dynamic_cache(pair, name):
    model, _tok = pair
    ids = _ids(70)
    ref = _gen(model, ids, DynamicCache(config=model.config))
    text = name + (":window=8" if name == "snapkv" else "")
    cache = make_evict_cache(model, text)
    try:
        assert torch.equal(_gen(model, ids, cache), ref)
        # batch 2, left padding on the first row
        ids2 = torch.cat([_ids(60, seed=1), _ids(60, seed=2)])
        mask = torch.ones_like(ids2)
        mask[0, :9] = 0
        ref2 = _gen(model, ids2, DynamicCache(config=model.config), mask=mask)
        cache2 = make_evict_cache(model, text)
        assert torch.equal(_gen(model, ids2, cache2, mask=mask), ref2)
    finally:
        cache.close()


def test_two_call_prefill_at_keep_one_matches(pair):
    model, _tok = pair
    ids = _ids(70)
    ref = _gen(model, ids, DynamicCache(config=model.config))
    cache = make_evict_cache(model, "tova")
    try:
        with torch.inference_mode():
            model(input_ids=ids[:, :50], cache=cache, use_cache=True)
        assert torch.equal(_gen(model, ids, cache), ref)
    finally:
        cache.close()


def test_key_norm_keeps_exactly_the_lowest_norm_keys(pair):
    model, _tok = pair
    ids = _ids(64)
    full = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, cache=full, use_cache=True)
    cache = make_evict_cache(model, "knorm:keep=0.25")
    try:
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, EvictLayer):
                continue
            ref_k = full.layers[i].keys  # [1, h, 64, d]
            norms = ref_k.float().norm(dim=-1)
            want = norms.topk(16, dim=-1, largest=False).indices.sort(-1).values
            kept = layer.tail_k.decode()
            assert layer.tail_k.n == layer.tail_v.n == 16  # evicted tokens are gone, not masked
            assert torch.equal(kept, ref_k.gather(2, want[..., None].expand(-1, -1, -1, ref_k.shape[-1])))
    finally:
        cache.close()


@pytest.mark.parametrize("text", ["tova:keep=0.5", "streaming:keep=0.25", "h2o:keep=0.5+fp8", "snapkv:keep=0.5,window=8+tq4",
                                  "knorm:keep=0.125+kivi2", "tova:budget=20+tq3"])
def test_bytes_equal_the_prediction_after_prefill_and_decode(pair, text):
    model, _tok = pair
    policy, codec = parse_baseline(text)
    cache = make_evict_cache(model, text)
    try:
        ids = _ids(80)
        out = _gen(model, ids, cache, n=7)
        calls = [80] + [1] * (out.shape[1] - 81)
        held = kept_tokens(policy, calls)
        if policy.continuous and not policy.budget:
            assert held == math.ceil(policy.ratio * sum(calls))
        layers = _evict_layers(cache)
        assert layers
        for layer in layers:
            h, d = layer.heads, layer.dim
            assert layer.tail_k.n == held
            want = h * (vectors_nbytes(codec if codec != "none" else "fp32", d, held, "key")
                        + vectors_nbytes(codec if codec != "none" else "fp32", d, held, "value"))
            if policy.accumulates:
                want += 4 * h * held
            assert layer.nbytes(include_codec_state=False) == want
    finally:
        cache.close()


@pytest.mark.parametrize("text,match", [
    ("tova:keep=0", r"\(0, 1\]"),
    ("snapkv:keep=1.5", r"\(0, 1\]"),
    ("h2o:recent=1", "recent"),
    ("snapkv:kernel=4", "kernel must be one of"),
    ("knorm:window=3", "unknown key"),
    ("tova:budget=-2", ">= 0"),
    ("tova:keep=half", "must be a number"),
    ("lru:keep=0.5", "unknown recipe"),
    ("tova+tq9", "unknown storage codec"),
    ("tova:keep=0.5,budget=10", "give keep or budget, not both"),  # issue 25, 3.12: keep was silently ignored
    ("snapkv:budget=8,keep=0.25", "not both"),
])
def test_bad_parameters_refused_when_parsed(text, match):
    with pytest.raises(InvalidInput, match=match):
        parse_baseline(text)


@pytest.mark.parametrize("text,match", [
    ("tova:budget=500", "above the 40 tokens"),
    ("snapkv:keep=0.5,window=64", "observation window 64 is longer than the 40-token prompt"),
    ("tova:keep=0.5+kivi2", "append-only"),
])
def test_bad_input_for_the_prompt_refused_before_storing(pair, text, match):
    model, _tok = pair
    if "kivi" in text:  # refused when the cache is built, before any tensor exists
        with pytest.raises(InvalidInput, match=match):
            make_evict_cache(model, text)
        return
    cache = make_evict_cache(model, text)
    try:
        with pytest.raises(InvalidInput, match=match), torch.inference_mode():
            model(input_ids=_ids(40), cache=cache, use_cache=True)
        assert all(not layer.is_initialized or layer.tail_k.n == 0 for layer in _evict_layers(cache))
    finally:
        cache.close()


def test_question_agnostic_snapkv_keeps_other_tokens_than_aware(pair):
    model, _tok = pair
    ids = _ids(80, seed=5)
    kept = []
    for split in (0, 60):
        cache = make_evict_cache(model, "snapkv:keep=0.25,window=8")
        try:
            with torch.inference_mode():
                if split:
                    model(input_ids=ids[:, :split], cache=cache, use_cache=True)
                model(input_ids=ids[:, split:], cache=cache, use_cache=True)
            layer = _evict_layers(cache)[0]
            kept.append(layer.tail_k.n)
        finally:
            cache.close()
    assert kept == [20, 15 + 20]  # aware: 1/4 of 80; agnostic: 1/4 of the 60 context tokens + the 20 question tokens


@pytest.mark.parametrize("text", ["tova:keep=0.5", "snapkv:keep=0.25,window=8+tq4", "h2o:keep=0.125+fp8",
                                  "knorm:keep=0.5+kivi2", "streaming:budget=30+tq3", "knorm"])
@pytest.mark.parametrize("n", [40, 97])
def test_planner_predicts_the_measured_bytes(pair, text, n):
    model, _tok = pair
    cache = make_evict_cache(model, text)
    with torch.inference_mode():
        model(input_ids=_ids(n), cache=cache, use_cache=True)
    want = predict_nbytes(ModelShape.from_model(model), text, n)
    assert [layer.nbytes(include_codec_state=False) for layer in cache.layers] == want
