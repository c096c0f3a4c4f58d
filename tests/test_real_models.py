"""Real embedded models (slow: the first load dequantises the GGUF file, later loads read the safetensors cache).

Slow tests use the real kvslim cache ($KVSLIM_CACHE or ~/.cache/kvslim; see conftest), so each model converts once."""

import time

import pytest
import torch
from transformers import DynamicCache

from kvslim.generation import generate
from kvslim.models import _converted_dir, find_gguf, load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


def test_smollm2_answers_paris(smollm2):
    res = generate(*smollm2, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in res.text
    assert res.kv_bytes > 0


def test_second_load_reads_the_safetensors_cache(smollm2):
    folder = _converted_dir(find_gguf("smollm2-135m"))
    assert (folder / "model.safetensors").is_file()
    t0 = time.perf_counter()
    model, _ = load("smollm2-135m")
    assert time.perf_counter() - t0 <= 10.0
    for a, b in zip(model.state_dict().values(), smollm2[0].state_dict().values()):
        assert torch.equal(a, b)


def test_generate_continues_a_cached_prompt(smollm2):
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. The quick brown", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        cache = DynamicCache(config=model.config)
        model(ids[:, :-3], cache=cache)  # prefill a prefix, then let generate continue from the cache
        out = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, out)


def test_gemma3_generates_text():
    model, tok = load("gemma3-270m")
    res = generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert res.new_tokens > 0 and "Paris" in res.text
