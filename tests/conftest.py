"""Shared fixtures: tiny random models (no downloads) and a tiny model folder with a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = ["<unk>", "<pad>", "<eos>"] + [f"w{i}" for i in range(125)]


# Modules whose tests compare a lossy path (codecs, selection, pooling) across chunkings, batches or code paths:
# marked `lossy`, and `make test` runs them again under each ATEN_CPU_CAPABILITY (PyTorch picks its SIMD kernels by
# CPU, and a value on a quantization boundary may round the other way). Such a test compares paths that see
# bit-identical inputs, or states a tolerance that a flipped code cannot break.
LOSSY_MODULES = {
    "test_cache_consistency", "test_cache_from_codes", "test_cache_attend_fast", "test_cache_recall",
    "test_cache_summaries", "test_eval_prefill_chunk", "test_eval_batch", "test_eval_share", "test_quant_codecs",
    "test_quant_tq", "test_method_contract", "test_cache_fork", "test_eval_reuse",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in LOSSY_MODULES:
            item.add_marker(pytest.mark.lossy)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Fast unit tests never write into the user's ~/.cache/kvslim; slow real-model tests use it, so each embedded
    model is dequantised once per machine (set KVSLIM_TEST_KEEP_CACHE to keep the real cache for every test)."""
    if request.node.get_closest_marker("slow") is None and "KVSLIM_TEST_KEEP_CACHE" not in __import__("os").environ:
        monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path_factory.mktemp("kvslim-cache")))


@pytest.fixture(scope="session")
def tiny_llama():
    from kvslim.testing import tiny_llama as build

    return build()


@pytest.fixture(scope="session")
def tiny_gemma3():
    from kvslim.testing import tiny_gemma3 as build

    return build()


def make_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local HF model folder: tiny random Llama (vocab 128) + a word-level tokenizer over w0..w124."""
    from kvslim.testing import tiny_llama as build

    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build(max_position_embeddings=64)
    model.save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tiny_llama, tiny_gemma3):
    """Both tiny architectures by name, for tests parametrized over ``arch``."""
    return {"llama": tiny_llama, "gemma3": tiny_gemma3}
