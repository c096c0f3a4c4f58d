"""Issue 15, model files: GGUF files checked before parsing, the dequantised cache verified against its manifest
(rebuilt with a warning when truncated or damaged), an unwritable cache folder -> an in-memory load with a warning."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from kvslim import models
from kvslim.errors import InvalidInput

MANIFEST = "kvslim-files.json"


def write_gguf(path: Path) -> Path:
    """A small valid GGUF file: some metadata and two float tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_token_list(["a", "b", "c"])
    w.add_tensor("t0", np.arange(1000, dtype=np.float32))
    w.add_tensor("t1", np.ones((16, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("damage,text", [
    ("empty", "is empty"),
    ("text", "is not a GGUF file"),
    ("header", "is truncated"),
    ("data", "is truncated: its tensors need"),
    ("version", "GGUF version 99"),
])
def test_broken_gguf_files_are_one_line_errors(tmp_path, damage, text):
    good = write_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"empty": b"", "text": b"not a model at all\n" * 4, "header": data[:40],
                     "data": data[:-100], "version": data[:4] + (99).to_bytes(4, "little") + data[8:]}[damage])
    with pytest.raises(InvalidInput, match=text) as err:
        models.load(str(bad))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch, tiny_model_dir):
    """The GGUF -> safetensors conversion replaced by a copy of a tiny model folder (the verify/rebuild logic under
    test is kvslim's; transformers' dequantiser needs a real model, see the slow test). Counts conversions."""
    calls = []

    def convert(gguf, target, status):
        calls.append(target)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copytree(tiny_model_dir, tmp)
        try:
            from kvslim.model_files import write_manifest
        except ImportError:  # a kvslim without manifests
            pass
        else:
            write_manifest(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return write_gguf(tmp_path / "m.gguf"), calls


def _load_warnings(path):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        model, _tok = models.load(str(path))
    return model, [str(w.message) for w in got if type(w.category).__name__ == "type" and w.category.__name__ == "KvslimWarning"]


@pytest.mark.parametrize("damage,text", [("flip", "does not match its checksum"), ("truncate", "bytes,")])
def test_a_damaged_dequantised_cache_is_rebuilt(fake_conversion, damage, text):
    gguf, calls = fake_conversion
    ref, msgs = _load_warnings(gguf)
    assert len(calls) == 1 and msgs == []
    ref = [p.detach().clone() for p in ref.parameters()]  # the loaded tensors may map the file damaged below
    weights = models._converted_dir(gguf) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    model, msgs = _load_warnings(gguf)
    assert len(calls) == 2 and len(msgs) == 1 and text in msgs[0] and "rebuilding" in msgs[0]
    for a, b in zip(ref, model.parameters(), strict=True):
        assert a.equal(b)
    assert _load_warnings(gguf)[1] == [] and len(calls) == 2  # verified, not rebuilt again


def test_an_old_cache_without_manifest_is_adopted_or_rebuilt(fake_conversion):
    gguf, calls = fake_conversion
    _load_warnings(gguf)
    folder = models._converted_dir(gguf)
    (folder / MANIFEST).unlink()
    assert _load_warnings(gguf)[1] == [] and (folder / MANIFEST).is_file() and len(calls) == 1  # adopted
    (folder / MANIFEST).unlink()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an older cache truncated: it cannot load, so it is rebuilt
    _model, msgs = _load_warnings(gguf)
    assert len(calls) == 2 and len(msgs) == 1 and "rebuilding" in msgs[0]


@pytest.mark.slow
def test_an_unwritable_cache_loads_in_memory_with_a_warning(tmp_path, monkeypatch):
    import torch

    try:
        models.find_gguf("smollm2-135m")
    except Exception as exc:
        pytest.skip(f"smollm2-135m not installed: {exc}")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path / "file" / "cache"))  # below a file: nothing can be created
    torch.set_num_threads(1)
    model, msgs = _load_warnings("smollm2-135m")
    assert len(msgs) == 1 and "in memory" in msgs[0] and str(tmp_path / "file") in msgs[0]
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
