"""Issue 15, caches know what they belong to: another model or another batch is one clear error; the library
``generate`` refuses a cache that already holds a context unless asked to continue it (and then continues it)."""

from __future__ import annotations

import pytest
import torch

from kvslim import generate, make_cache
from kvslim.errors import InvalidInput
from kvslim.eval.harness.tiny import tiny_pair


def test_a_cache_used_by_another_model_is_refused(tiny_llama, tiny_gemma3):
    cache = make_cache(tiny_llama, "window:w=64")
    try:
        with pytest.raises(InvalidInput, match="built for llama"):
            tiny_gemma3(torch.arange(10)[None], cache=cache, use_cache=True)
    finally:
        cache.close()


def test_a_cache_used_with_another_batch_is_refused(tiny_llama):
    cache = make_cache(tiny_llama, "window:w=64")
    try:
        with torch.inference_mode():
            tiny_llama(torch.arange(10)[None], cache=cache, use_cache=True)
            with pytest.raises(InvalidInput, match="holds a batch of 1 sequence"):
                tiny_llama(torch.arange(2)[None].repeat(2, 1), cache=cache, use_cache=True)
    finally:
        cache.close()


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-gemma3")


def test_generate_refuses_a_cache_of_another_model(pair, tiny_llama):
    model, tok = pair
    cache = make_cache(tiny_llama, "full")
    try:
        with pytest.raises(InvalidInput, match="built for llama"):
            generate(model, tok, "hello", max_new_tokens=2, cache=cache)
    finally:
        cache.close()


@pytest.mark.parametrize("recipe", [None, "window:w=64"])
def test_generate_refuses_a_used_cache_unless_continued(pair, recipe):
    from transformers import DynamicCache

    model, tok = pair
    first = tok("the first prompt", return_tensors="pt")["input_ids"]
    cache = DynamicCache(config=model.config) if recipe is None else make_cache(model, recipe)
    try:
        with torch.inference_mode():
            model(first, cache=cache, use_cache=True)
        with pytest.raises(InvalidInput, match=f"already holds {first.shape[1]} tokens"):
            generate(model, tok, "a second prompt", max_new_tokens=4, cache=cache, chat=False)
        got = generate(model, tok, "a second prompt", max_new_tokens=4, cache=cache, chat=False, continue_cache=True)
        second = tok("a second prompt", return_tensors="pt")["input_ids"]
        both = torch.cat([first, second], dim=1)
        ref_cache = DynamicCache(config=model.config) if recipe is None else make_cache(model, recipe)
        with torch.inference_mode():
            ref = model.generate(input_ids=both, attention_mask=torch.ones_like(both), max_new_tokens=4,
                                 do_sample=False, cache=ref_cache, pad_token_id=tok.pad_token_id)
        assert got.text == tok.decode(ref[0, both.shape[1]:], skip_special_tokens=True).strip()
        assert got.prompt_tokens == second.shape[1]
    finally:
        if recipe is not None:
            cache.close()
