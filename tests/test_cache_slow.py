"""Real models (SmolLM2 GQA, Gemma 3 270M MQA with local layers): lossless recipes token-identical to DynamicCache,
and compressed recipes keep next-token loss on natural text close to the full cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvslim.cache import compressed
from kvslim.cache.methods.latent.calibration import _calibration_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from kvslim.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="module")
def gemma():
    from kvslim.models import load

    return load("gemma3-270m")


def _greedy(model, ids, cache, n=16):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              cache=cache, pad_token_id=0)


@pytest.mark.parametrize("recipe", ["full", "window:w=4096", "v4:w=4096", "full+fp32"])
def test_smollm2_lossless_identical(smol, recipe):
    model, tok = smol
    ids = tok("The three primary colours are", return_tensors="pt")["input_ids"]
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    with compressed(model, recipe) as cache:
        assert torch.equal(_greedy(model, ids, cache), ref)


def _nll(model, ids, recipe, prefix):
    """Mean next-token loss on ids[prefix:] after a one-shot prefill of ids[:prefix], fed in chunks of 32."""
    ctx = compressed(model, recipe) if recipe else None
    cache = ctx.__enter__() if ctx else DynamicCache(config=model.config)
    try:
        with torch.inference_mode():
            logits = [model(ids[:, :prefix], cache=cache).logits[:, -1:]]
            for a in range(prefix, ids.shape[1] - 1, 32):
                logits.append(model(ids[:, a : min(a + 32, ids.shape[1] - 1)], cache=cache).logits)
        lg = torch.cat(logits, 1)[0].float()
        return torch.nn.functional.cross_entropy(lg, ids[0, prefix:]).item()
    finally:
        if ctx:
            ctx.__exit__(None, None, None)


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_compressed_loss_close_to_full(which, request):
    model, tok = request.getfixturevalue(which)
    ids = tok(_calibration_text(6000), return_tensors="pt")["input_ids"][:, :640]
    full = _nll(model, ids, None, 512)
    for recipe in ("v4:w=64+tq3", "window:w=64,sinks=4"):
        lossy = _nll(model, ids, recipe, 512)
        assert lossy < full + 1.0, (recipe, lossy, full)
