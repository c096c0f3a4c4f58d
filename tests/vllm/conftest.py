"""The vLLM tests' SmolLM2 safetensors folder (written by kvslim's loader, see kvslim.vllm.run)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from kvslim.vllm.run import find_model_folder


@pytest.fixture(scope="session")
def smol_folder() -> str:
    folder = find_model_folder()
    if folder is None:
        pytest.skip("no SmolLM2 safetensors folder: run `.venv/bin/python -m kvslim.vllm.run --model-folder` once "
                    "(or set KVSLIM_VLLM_MODEL)")
    return str(folder)


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir():
    """vLLM leaves its rendezvous file (``vllm_dist_<uuid>``) and IPC sockets in the temp folder when an engine is
    stopped from outside (the serve test) or fails at startup (the refusal tests): every process these tests start
    gets a private temp folder, removed at the end of the session."""
    tmp = tempfile.mkdtemp(prefix="kvslim-vllm-tests-")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tmp
    yield tmp
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    shutil.rmtree(tmp, ignore_errors=True)
