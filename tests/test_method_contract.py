"""The contract every registered compression method passes, with no test code of its own.

Parametrised over ``kvslim.cache.method.methods()`` (the built-ins plus every file in ``tests/plugins/``, which
holds the contributor guide's example): each method's declared lossless settings are token-identical to
``DynamicCache`` (batch 1 and a left-padded batch of 2); methods declaring chunk invariance give the same logits
one-shot, chunked and token by token; ``nbytes()`` equals the planner's prediction at several lengths, window and
block boundaries included, with and without codecs (after each chunk, or for methods that are not chunk-invariant
after a one-shot prefill of each length); bad parameters are refused before anything is allocated.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import kvslim
from kvslim.cache import make_cache, predict_nbytes
from kvslim.cache.method import INT64_MAX, LOSSLESS_CONTEXT, ModelShape, methods
from kvslim.cache.recipe import parse_recipe
from kvslim.errors import InvalidInput


def _load_plugins() -> None:
    for path in sorted((Path(__file__).parent / "plugins").glob("*.py")):
        name = f"kvslim_test_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None or name in __import__("sys").modules:
            continue
        module = importlib.util.module_from_spec(spec)
        __import__("sys").modules[name] = module
        spec.loader.exec_module(module)


_load_plugins()
METHODS = methods()
NAMES = sorted(METHODS)
ARCHS = ["llama", "gemma3"]


def _text(name: str, params: dict, codec: str = "") -> str:
    args = ",".join(f"{k}={v}" for k, v in params.items())
    return name + (f":{args}" if args else "") + (f"+{codec}" if codec else "")


def _greedy(model, ids, cache, n=20, mask=None):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache=cache, pad_token_id=0)


def test_registry_lists_the_built_ins_and_the_example():
    assert {"full", "window", "blocks", "heavy", "v4", "latent", "stride"} <= set(NAMES)
    for cls in METHODS.values():
        assert cls.summary and "\n" not in cls.summary and cls.exactness in ("tokens", "float")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_lossless_settings_equal_dynamic_cache(tiny_models, arch, name):
    model = tiny_models[arch]
    shape = ModelShape.from_model(model)
    ids = torch.randint(1, 128, (1, 45), generator=torch.Generator().manual_seed(1))
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    assert ids.shape[1] + 20 < LOSSLESS_CONTEXT
    for params in METHODS[name].lossless_params(shape):
        cache = make_cache(model, _text(name, params))
        assert torch.equal(_greedy(model, ids, cache), ref), params
        assert cache.get_seq_length() == ids.shape[1] + 19


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_lossless_left_padded_batch(tiny_models, arch, name):
    model = tiny_models[arch]
    params = METHODS[name].lossless_params(ModelShape.from_model(model))[0]
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    ref = _greedy(model, ids, DynamicCache(config=model.config), n=12, mask=mask)
    assert torch.equal(_greedy(model, ids, make_cache(model, _text(name, params)), n=12, mask=mask), ref)


def _logits(model, recipe, ids, sizes):
    cache = make_cache(model, recipe)
    out, start = [], 0
    with torch.inference_mode():
        for size in sizes:
            out.append(model(ids[:, start : start + size], cache=cache).logits)
            start += size
    assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(out, dim=1)


CHUNKED = [(n, i) for n in NAMES if METHODS[n].chunk_invariant for i in range(len(METHODS[n].examples))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("name", "i"), CHUNKED)
def test_one_shot_equals_chunked_equals_token_by_token(tiny_models, arch, name, i):
    model = tiny_models[arch]
    recipe = _text(name, METHODS[name].examples[i])
    ids = torch.randint(1, 128, (1, 41), generator=torch.Generator().manual_seed(7))
    one = _logits(model, recipe, ids, [41])
    torch.testing.assert_close(_logits(model, recipe, ids, [5, 11, 1, 7, 17]), one, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(model, recipe, ids, [1] * 41), one, atol=2e-4, rtol=1e-4)


BYTES = [(n, p, c) for n in NAMES for p in [*METHODS[n].examples, *METHODS[n].lossless] for c in ("", "fp8", "kivi2")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("name", "params", "codec"), BYTES)
def test_nbytes_equal_the_planner(tiny_models, arch, name, params, codec):
    """Measured per-layer bytes (codec constants aside) == the method's prediction, after every chunk."""
    model = tiny_models[arch]
    shape = ModelShape.from_model(model)
    if name == "latent" and params.get("r", 0) > shape.head_dim:
        params = {"r": shape.head_dim}
    recipe = _text(name, params, codec)
    reasons = METHODS[name](METHODS[name].Params(**params), codec or "none").check(shape)
    if reasons:  # a combination the method refuses (eviction at every step with KIVI): refused up front
        with pytest.raises(InvalidInput):
            make_cache(model, recipe)
        return
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(5))
    for cache, seen in _feeds(model, recipe, ids, (1, 4, 3, 1, 8, 9, 16, 1, 27), METHODS[name].chunk_invariant):
        measured = [layer.nbytes(include_codec_state=False) for layer in cache.layers]
        assert measured == predict_nbytes(shape, recipe, seen), (recipe, seen)
    tiers = cache.tier_nbytes()
    cold = sum(layer.predict(layer.spec, seen, shape).get("cold", 0) for layer in cache.layers)  # tiered methods
    assert tiers["hot"] == cache.nbytes() and tiers["cold"] == cold and tiers["fetched"] == 0  # last call: a prefill


def _feeds(model, recipe, ids, sizes, chunked):
    """``(cache, tokens seen)`` after each chunk of ``sizes`` (crossing every window / block boundary of the
    examples). The planner prices a cache after a prefill of n tokens; a method that is not chunk-invariant (its
    state depends on how the tokens arrived: eviction scores) is checked after a one-shot prefill of each total."""
    seen = 0
    cache = make_cache(model, recipe)
    with torch.inference_mode():
        for size in sizes:
            if not chunked:
                cache = make_cache(model, recipe)
                model(ids[:, : seen + size], cache=cache)
            else:
                model(ids[:, seen : seen + size], cache=cache)
            seen += size
            yield cache, seen


BAD = [(n, key, value) for n in NAMES for key, (typ, _d, _m) in METHODS[n].Params.spec().items()
       for value in ((10**30, -1) if typ is int else ("nonsense",))]  # fmt: skip


@pytest.mark.parametrize(("name", "key", "value"), BAD)
def test_bad_parameters_are_refused_before_allocation(name, key, value):
    from kvslim.testing import tiny_llama

    text = f"{name}:{key}={value}"
    md = METHODS[name].Params.__dataclass_fields__[key].metadata
    if value == -1 and (md.get("lo") is None or md.get("lo") <= -1) and md.get("choices") is None:
        pytest.skip(f"{name}.{key} takes -1 (recall's pin/span: auto)")
    with pytest.raises(InvalidInput) as err:
        parse_recipe(text)
    assert "\n" not in str(err.value) and key in str(err.value)
    model = tiny_llama()
    with pytest.raises(InvalidInput):
        make_cache(model, text)
    assert model.config._attn_implementation == "sdpa"


def test_int64_bound_and_full_first():
    with pytest.raises(InvalidInput, match="64-bit"):
        parse_recipe("window:w=1000000000000000000000000000000")
    assert parse_recipe(f"window:w={INT64_MAX}").get("w") == INT64_MAX
    with pytest.raises(InvalidInput, match="64-bit"):
        parse_recipe("full:full_first=1000000000000000000000000000000")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_building_a_cache_changes_nothing_for_other_caches(impl):
    """Logits of a DynamicCache forward are bit-identical before and after make_cache; nothing to restore."""
    from kvslim.testing import tiny_gemma3, tiny_llama

    for build in (tiny_llama, tiny_gemma3):
        model = build(attn_implementation=impl)
        ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(4))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        with torch.inference_mode():
            before = model(ids, attention_mask=mask, cache=DynamicCache(config=model.config)).logits
            kvslim.make_cache(model, "v4:w=8,m=2,k=3,hm=6+tq3")
            after = model(ids, attention_mask=mask, cache=DynamicCache(config=model.config)).logits
            plain = model(ids, attention_mask=mask).logits
        assert torch.equal(before, after) and torch.equal(before, plain)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smollm2_nbytes_equal_the_planner(name):
    from kvslim.models import load

    model, _ = load("smollm2-135m")
    shape = ModelShape.from_model(model)
    cls = METHODS[name]
    for params in [*cls.lossless_params(shape)[:1], *cls.examples[:1]]:
        recipe = _text(name, params, "tq3")
        ids = torch.randint(1, 1000, (1, 300), generator=torch.Generator().manual_seed(6))
        for cache, seen in _feeds(model, recipe, ids, (130, 1, 169), cls.chunk_invariant):
            measured = [layer.nbytes(include_codec_state=False) for layer in cache.layers]
            assert measured == predict_nbytes(shape, recipe, seen), (recipe, seen)
