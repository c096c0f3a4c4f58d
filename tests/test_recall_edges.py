"""recall at its edges (issue 25): every prompt token in the sinks, cold files and closed caches, corrupted cold
rows, stale temporary folders."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvslim.cache import make_cache
from kvslim.testing import tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "gemma3": tiny_gemma3()}


def _greedy(model, ids, cache, n=6):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              cache=cache, pad_token_id=0)  # fmt: skip


def _ids(n=45, b=1, seed=1):
    return torch.randint(1, 128, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("opts", ["sinks=40", "sinks=40,prefill=select", "sinks=6", "sinks=40,store=disk"])
def test_prompt_wholly_in_the_sinks(models, arch, opts):
    """sinks >= prompt tokens: the prefill has no tail yet (was a TypeError in _prefill); exact like full."""
    model = models[arch]
    ids = _ids(6)
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    cache = make_cache(model, f"recall:{opts}")
    try:
        assert torch.equal(_greedy(model, ids, cache), ref)
    finally:
        cache.close()


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_closed_cache_reports_no_cold_bytes_and_refuses_a_forward(models, store):
    """After close(): tier_nbytes() said the cold bytes were still held and the next forward raised a bare
    TypeError (ram) or a ColdTierError after the first layers had stored the token (disk)."""
    from kvslim.errors import ColdTierError, InvalidInput

    model = models["llama"]
    cache = make_cache(model, f"recall:m=4,w=8,sinks=2,k=1,store={store}")
    ids = _ids()
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    assert cache.tier_nbytes()["cold"] > 0
    seen = cache.get_seq_length()
    cache.close()
    assert cache.tier_nbytes()["cold"] == 0 and cache.tier_nbytes()["fetched"] == 0
    with pytest.raises(InvalidInput, match="cache was closed"), torch.inference_mode():
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert [layer.get_seq_length() for layer in cache.layers] == [seen] * len(cache.layers)  # nothing stored
    with pytest.raises(ColdTierError, match="released by cache.close"):  # a stream used directly: named, one line
        cache.layers[0].cold_k.read(0, 1)
    cache.close()  # twice: harmless
