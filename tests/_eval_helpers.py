"""Shared helpers of the eval tests (not a test module): real tokenizers when installed, a cache double."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def real_tokenizer(name: str):
    """The tokenizer of an embedded model from kvslim's converted-model cache, or skip the test."""
    from transformers import AutoTokenizer

    from kvslim import models

    try:
        folder = models._converted_dir(models.find_gguf(name))
    except Exception as exc:  # model package missing
        pytest.skip(f"{name} not installed: {exc}")
    if not (folder / "config.json").is_file():
        return models.load(name)[1]  # first use on this machine: dequantise and cache the model
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def window_double(window: int = 48):
    """A test-only compressed cache: every layer keeps only its last ``window - 1`` tokens (stock sliding layers)."""

    def make(model):
        from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

        n = model.config.num_hidden_layers
        return Cache(layers=[DynamicSlidingWindowLayer(sliding_window=window) for _ in range(n)])

    return make
