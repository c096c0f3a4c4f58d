"""The vLLM tests' SmolLM2 safetensors folder (written by kvslim's loader, see kvslim.vllm.run)."""

from __future__ import annotations

import pytest

from kvslim.vllm.run import find_model_folder


@pytest.fixture(scope="session")
def smol_folder() -> str:
    folder = find_model_folder()
    if folder is None:
        pytest.skip("no SmolLM2 safetensors folder: run `.venv/bin/python -m kvslim.vllm.run --model-folder` once "
                    "(or set KVSLIM_VLLM_MODEL)")
    return str(folder)
