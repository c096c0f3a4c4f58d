"""The format registry: flags drive the caches, and a format registered from outside works end to end
(the worked example of docs/contributing.md)."""

from __future__ import annotations

import pytest
import torch

from kvslim import formats
from kvslim.cache import make_cache, predict_nbytes
from kvslim.cache.method import ModelShape
from kvslim.cache.recipe import CODECS
from kvslim.errors import InvalidInput
from kvslim.quant import CODEC_NAMES, make_codec
from kvslim.quant.base import Codec, Packed


class Int8Codec(Codec):
    name, bits_per_value = "int8", 8.0

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def bytes_per_vector(self) -> int:
        return self.dim + 4

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        codes = torch.round(x.float() / scale).to(torch.int8)
        return Packed(self.name, tuple(x.shape), x.dtype, {"codes": codes, "scale": scale})

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        return (packed.fields["codes"].float() * packed.fields["scale"]).to(packed.dtype)


def make_int8(name: str, dim: int, seed: int, **options) -> Int8Codec:
    return Int8Codec(dim)


def test_lists_read_the_registry():
    assert set(CODEC_NAMES) == {n for n, f in formats.REGISTRY.items() if f.codec and "gqa" in f.kinds}
    assert set(CODECS) == {"none", *CODEC_NAMES} and "fp8_ds_v4" not in CODECS
    assert [n for n in formats.FORMATS if formats.get_format(n).append_only] == ["kivi2", "kivi4"]
    assert {n for n in formats.FORMATS if formats.get_format(n).calibrated} == {"tq2.5", "tq3.5"}
    with pytest.raises(InvalidInput, match="registered twice"):
        formats.register_format(formats.get_format("fp8"))


@pytest.fixture
def int8_format():
    """The worked example registered for one test, and removed after it (the registry is process-wide)."""
    fmt = formats.register_format(formats.Format("int8", "int8 codes + one fp32 absmax scale per vector",
                                                 lambda d, role: d + 4, codec=f"{__name__}:make_int8", kinds=("gqa",)))
    try:
        yield fmt
    finally:
        del formats.REGISTRY["int8"]


def test_an_outside_format_works_end_to_end(tiny_llama, int8_format):
    assert isinstance(make_codec("int8", 16), Int8Codec) and "int8" in CODECS
    cache = make_cache(tiny_llama, "v4:w=8,m=2,k=3,hm=6+int8")
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = tiny_llama(ids).logits
        out = tiny_llama(ids, cache=cache).logits
    shape = ModelShape.from_model(tiny_llama)
    assert [la.nbytes(include_codec_state=False) for la in cache.layers] == predict_nbytes(shape, cache.recipe, 40)
    assert type(cache.layers[0].blk_k.codec) is Int8Codec and (out - ref).abs().max() < 1.0
