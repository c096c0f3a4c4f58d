"""The planner's bytes equal what transformers' DynamicCache holds after a prefill (tiny and real models)."""

from __future__ import annotations

import pytest

from kvslim.memory import cache_nbytes
from kvslim.plan import check_cache, expected_cache_bytes
from kvslim.plan.spec_hf import from_config


def _prefill_bytes(model, n: int) -> int:
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache_nbytes(cache)


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 40])
def test_tiny_gemma3_sliding_and_full(n: int) -> None:
    from kvslim.testing import tiny_gemma3

    model = tiny_gemma3()  # 3 sliding layers (window 16) + 1 full; fp32
    assert _prefill_bytes(model, n) == expected_cache_bytes(from_config(model.config), n, "fp32")


@pytest.mark.parametrize("n", [1, 7, 33])
def test_tiny_llama(n: int) -> None:
    from kvslim.testing import tiny_llama

    model = tiny_llama()
    assert _prefill_bytes(model, n) == expected_cache_bytes(from_config(model.config), n, "fp32")


def test_tiny_bf16_model_counts_two_bytes() -> None:
    import torch

    from kvslim.testing import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    assert _prefill_bytes(model, 9) == expected_cache_bytes(from_config(model.config), 9, "bf16")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "n"), [("smollm2-135m", 300), ("gemma3-270m", 600)])
def test_embedded_models(name: str, n: int) -> None:
    from kvslim.models import load

    model, _ = load(name)
    assert _prefill_bytes(model, n) == expected_cache_bytes(from_config(model.config), n, "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_presets_equal_loaded_configs(name: str) -> None:
    from kvslim.models import embedded_config
    from kvslim.plan.presets import preset

    cfg = embedded_config(name)
    if cfg is None:
        pytest.skip(f"{name} is not installed")
    got, want = from_config(cfg), preset(name)
    assert got.layers == want.layers
    assert got.mlps == want.mlps
    assert (got.hidden_size, got.vocab_size, got.max_context, got.tie_embeddings) == (
        want.hidden_size, want.vocab_size, want.max_context, want.tie_embeddings)  # fmt: skip


def test_check_cache_reports_mismatching_layers() -> None:
    import torch
    from transformers import DynamicCache

    from kvslim.testing import tiny_gemma3

    model = tiny_gemma3()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 20)), cache=cache, use_cache=True)
    spec = from_config(model.config)
    assert check_cache(cache, spec, 20, "fp32") == []
    wrong = check_cache(cache, spec, 21, "fp32")  # only the full layer (index 3) grows with n
    assert [(i, got) for i, got, _ in wrong] == [(3, 20 * 2 * 16 * 4)] and wrong[0][2] == 21 * 2 * 16 * 4
