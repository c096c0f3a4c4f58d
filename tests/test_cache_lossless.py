"""Each recipe's lossless setting gives greedy output token-identical to transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvslim
from kvslim.cache import compressed

# recipes whose parameters make them lossless for prompts + generations below 200 tokens
LOSSLESS = [
    "full",
    "window:w=1000,sinks=4",
    "blocks:m=4,k=8,w=1000",
    "heavy:m=64,w=1000",
    "v4:w=1000",
    "full+fp32",
    "v4:w=1000,full_first=1",
    "blocks:m=4,k=8,w=1000,pool=attn",  # explicit-softmax attention path
]
FLOAT_EXACT = ["latent:r=16", "blocks:m=1,k=0,w=4,sinks=0"]  # exact up to float rounding (r = head dim, m = 1)


def _greedy(model, ids, cache, n=24, mask=None):
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache=cache, pad_token_id=0
        )


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("recipe", LOSSLESS + FLOAT_EXACT)
def test_greedy_identical_to_dynamic_cache(tiny_models, arch, recipe):
    model = tiny_models[arch]
    ids = torch.randint(1, 128, (1, 45), generator=torch.Generator().manual_seed(1))
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    with compressed(model, recipe) as cache:
        out = _greedy(model, ids, cache)
        assert cache.get_seq_length() == ids.shape[1] + 23
    assert torch.equal(out, ref), recipe


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_deprecated_past_key_values_alias(tiny_models, arch):
    model = tiny_models[arch]
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    with compressed(model, "window:w=1000") as cache, torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batch_of_two_left_padded(tiny_models, arch):
    model = tiny_models[arch]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    ref = _greedy(model, ids, DynamicCache(config=model.config), mask=mask)
    with compressed(model, "blocks:m=4,k=8,w=1000") as cache:
        out = _greedy(model, ids, cache, mask=mask)
    assert torch.equal(out, ref)


def test_padding_never_enters_pooled_entries(tiny_models):
    """Changing the ids under the padding must not change a padded row's compressed output."""
    model = tiny_models["llama"]
    ids = torch.randint(1, 128, (2, 50), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    outs = []
    for pad_id in (0, 77):
        x = ids.clone()
        x[1, :13] = pad_id
        with compressed(model, "blocks:m=4,k=2,w=8,sinks=2,pool=norm") as cache:
            outs.append(_greedy(model, x, cache, mask=mask, n=12)[1, 50:])
    assert torch.equal(outs[0], outs[1])


def test_stock_caches_unaffected():
    from kvslim.testing import tiny_llama

    model = tiny_llama()
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model(ids).logits
        cache = kvslim.make_cache(model, "window:w=8")
        assert model.config._attn_implementation == "kvslim"
        # a stock cache on a model holding a kvslim cache runs transformers' own sdpa, bit for bit
        same = model(ids, cache=DynamicCache(config=model.config)).logits
        model(ids[:, :3], cache=cache)
    assert torch.equal(same, ref) and cache.get_seq_length() == 3


def test_beam_search_reorders_the_cache(tiny_models):
    model = tiny_models["llama"]
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ref = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
        with compressed(model, "blocks:m=4,k=8,w=1000") as cache:
            out = model.generate(ids, cache=cache, **kw)
    assert torch.equal(out, ref)
