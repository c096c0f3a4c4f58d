"""Issue 25 defect 7: an exception in the middle of a forward leaves the first layers with the new tokens and the
rest without; continuing such a cache answered silently wrong. It is refused in one line, by the next forward of a
kvslim cache and by ``kvslim.generate(..., continue_cache=True)`` for any cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_word_tokenizer
from kvslim.cache import make_cache
from kvslim.errors import InvalidInput
from kvslim.generation import generate
from kvslim.testing import tiny_llama

PROMPT = " ".join(f"w{i}" for i in range(30))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_hidden_layers=4)


def _torn(model, cache):
    """Prefill, then a continuation whose forward raises in layer 2 (a hook, as a user's instrumentation might)."""
    tok = make_word_tokenizer()
    generate(model, tok, PROMPT, max_new_tokens=3, cache=cache, chat=False)

    def boom(_mod, _args, _kwargs):
        raise RuntimeError("hook failed in layer 2")

    hook = model.model.layers[2].register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="hook failed"):
            generate(model, tok, "w5 w6", max_new_tokens=3, cache=cache, chat=False, continue_cache=True)
    finally:
        hook.remove()
    return tok


@pytest.mark.parametrize("recipe", ["full", "recall:m=4,w=8,sinks=2,k=1", "window:w=8,sinks=2", "dynamic"])
def test_generate_refuses_a_cache_torn_by_an_exception(model, recipe):
    cache = DynamicCache(config=model.config) if recipe == "dynamic" else make_cache(model, recipe)
    tok = _torn(model, cache)
    counts = [layer.get_seq_length() for layer in cache.layers]
    assert counts[0] == counts[1] != counts[2] == counts[3]
    with pytest.raises(InvalidInput, match=r"inconsistent: its layers hold different token counts \(\d+ tokens in "
                                           r"layers 0-1, \d+ tokens in layers 2-3\)"):  # fmt: skip
        generate(model, tok, "w5 w6", max_new_tokens=3, cache=cache, chat=False, continue_cache=True)
    if recipe != "dynamic":  # a plain forward on a kvslim cache is refused too, before any layer stores anything
        with pytest.raises(InvalidInput, match="inconsistent"), torch.inference_mode():
            model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
        assert [layer.get_seq_length() for layer in cache.layers] == counts


def test_a_layer_that_stored_without_attending_is_refused(model, monkeypatch):
    """The exception inside the last layer's attention: every layer counts the tokens, the last never stored them."""
    cache = make_cache(model, "full")
    ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)

    def fail(*_a, **_k):
        raise RuntimeError("attention failed")

    monkeypatch.setattr(cache.layers[3], "attend", fail)
    with pytest.raises(RuntimeError, match="attention failed"), torch.inference_mode():
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    monkeypatch.undo()
    with pytest.raises(InvalidInput, match="layer 3 stored tokens without attending them"), torch.inference_mode():
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)


def test_a_whole_cache_continues_as_before(model):
    cache = make_cache(model, "recall:m=4,w=8,sinks=2,k=1")
    tok = make_word_tokenizer()
    generate(model, tok, PROMPT, max_new_tokens=3, cache=cache, chat=False)
    res = generate(model, tok, "w5 w6", max_new_tokens=3, cache=cache, chat=False, continue_cache=True)
    assert res.new_tokens == 3
