from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models():
    from kvslim.testing import tiny_gemma3, tiny_llama

    return {"llama": tiny_llama(), "gemma3": tiny_gemma3()}
