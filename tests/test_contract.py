"""The byte contract holds across the project: codecs' measured bytes == the planner's formulas."""

import pytest
import torch

from kvslim import formats
from kvslim.quant import CODEC_NAMES, KiviStore, kivi_store_nbytes, make_codec


@pytest.mark.parametrize("name", [n for n in CODEC_NAMES if not n.startswith("kivi")])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_codec_bytes_equal_planner_bytes(name, dim):
    codec = make_codec(name, dim, seed=0)
    x = torch.randn(2, 3, 5, dim)
    packed = codec.encode(x)
    assert codec.nbytes(packed) == formats.vectors_nbytes(name, dim, 2 * 3 * 5)


@pytest.mark.parametrize("name", ["kivi2", "kivi4"])
@pytest.mark.parametrize("role", ["key", "value"])
@pytest.mark.parametrize("tokens", [1, 31, 32, 127, 128, 129, 300])
def test_kivi_stream_bytes_equal_planner_bytes(name, role, tokens):
    dim = 64
    codec = make_codec(name, dim, seed=0, role=role)
    store = KiviStore(codec)
    x = torch.randn(1, 1, tokens, dim)
    for chunk in x.split(37, dim=-2):
        store.append(chunk)
    measured = store.nbytes()
    assert measured == formats.vectors_nbytes(name, dim, tokens, role=role)
    assert measured == kivi_store_nbytes(tokens, dim, int(name[-1]), role)
