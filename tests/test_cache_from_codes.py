"""Attention straight from packed codes equals decode-then-attend: the codecs' score_f32 / mix_f32 (compiled kernel
and PyTorch fallback), and a cache's decode steps with and without reading the codes."""

from __future__ import annotations

import pytest
import torch

from kvslim.cache import compressed
from kvslim.cache.rows import is_rows
from kvslim.quant import kernels, make_codec
from kvslim.quant.base import Codec
from kvslim.quant.packing import pack_bits

FROM_CODES = ("tq1", "tq2", "tq3", "tq4", "tq2.5", "tq3.5", "tqprod2", "tqprod3", "tqprod4", "fp8", "kivi2", "kivi4")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", FROM_CODES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4, 9])
def test_codec_attention_from_codes_equals_decode_then_matmul(name, dim, group):
    g = torch.Generator().manual_seed(dim + group)
    role = "key" if group % 2 else "value"  # KIVI: both layouts over the grid
    codec = make_codec(name, dim, seed=1, role=role)
    assert codec.attends_from_codes
    x = torch.randn(2, 3, 96, dim, generator=g)
    q = torch.randn(2, 3, group, dim, generator=g)
    w = torch.softmax(torch.randn(2, 3, group, 96, generator=g), dim=-1)
    packed = codec.encode(x)
    assert _rel(codec.score_f32(q, packed), Codec.score_f32(codec, q, packed)) < 1e-5
    assert _rel(codec.mix_f32(w, packed), Codec.mix_f32(codec, w, packed)) < 1e-5


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dim", [16, 20, 64, 136])
def test_kernel_equals_pytorch_tables(bits, dim):
    if not kernels.available():
        pytest.skip("no C compiler: the PyTorch tables are what runs")
    g = torch.Generator().manual_seed(bits * dim)
    t = 77
    codes = pack_bits(torch.randint(0, 1 << bits, (2, t, dim), generator=g), bits)
    lut = torch.randn(1 << bits, generator=g)
    blk = 16 if dim % 16 == 0 else 4
    scale = torch.rand(2, t, -(-dim // blk), generator=g)
    q, w = torch.randn(2, 5, dim, generator=g), torch.randn(2, 5, t, generator=g)
    for sc, b in ((None, 0), (scale[..., :1], 0), (scale, blk)):
        assert _rel(kernels.lut_score(q, codes, bits, lut, dim, sc, b), kernels.table_score(q, codes, bits, lut, dim, sc, b)) < 1e-5
        assert _rel(kernels.lut_mix(w, codes, bits, lut, dim, sc, b), kernels.table_mix(w, codes, bits, lut, dim, sc, b)) < 1e-5
    qg = torch.randn(2, -(-t // 32), 5, dim, generator=g)  # one query set per 32 tokens (KIVI keys)
    assert _rel(kernels.lut_score(qg, codes, bits, lut, dim, qgroup=32), kernels.table_score(qg, codes, bits, lut, dim, qgroup=32)) < 1e-5


def test_fallback_without_kernel_matches(monkeypatch):
    codec = make_codec("tq3", 64)
    x, q = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 3, 64)
    packed = codec.encode(x)
    fast = codec.score_f32(q, packed)
    monkeypatch.setattr(kernels, "_kernel_ok", lambda *a: False)
    assert _rel(codec.score_f32(q, packed), fast) < 1e-5


RECIPES = [
    "full+tq4", "full+tq2.5", "full+tqprod3", "full+fp8", "full+kivi2", "full+kivi4",
    "window:w=8,wq=1+tq3", "blocks:m=4,k=2,w=8,sinks=2+tq3", "heavy:m=8,w=8+fp8", "v4:w=8,m=2,k=3,hm=6+tq3",
    "blocks:m=4,k=2,w=8,pool=attn+tq4",
]


def _decode_logits(model, recipe, ids, steps, from_codes, mask=None):
    """Prefill ``ids``, then ``steps`` one-token forwards of fixed tokens; last-position logits of every call."""
    feed = torch.randint(3, 120, (ids.shape[0], steps), generator=torch.Generator().manual_seed(5))
    with compressed(model, recipe) as cache, torch.inference_mode():
        kw = {} if mask is None else {"attention_mask": mask}
        out = model(ids, cache=cache, **kw)
        for layer in cache.layers:
            layer.from_codes = from_codes
        codes = [layer for layer in cache.layers if layer.tail_k.attends_from_codes()]
        assert all(is_rows(layer.read_tail(1)[0]) == from_codes for layer in codes)
        logits = [out.logits[:, -1]]
        for i in range(steps):
            if mask is not None:
                kw["attention_mask"] = mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            logits.append(model(feed[:, i : i + 1], cache=cache, **kw).logits[:, -1])
        return torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_cache_decode_from_codes_equals_decode_then_attend(tiny_models, arch, recipe):
    model = tiny_models[arch]
    ids = torch.randint(3, 120, (2, 21), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    for m in (None, mask):
        fast = _decode_logits(model, recipe, ids, 14, True, m)
        ref = _decode_logits(model, recipe, ids, 14, False, m)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_kth_largest_equals_topk():
    g = torch.Generator().manual_seed(0)
    for n, k in ((480, 32), (33, 32), (32, 32), (100, 1), (7, 3)):
        x = torch.randn(2, 25, n, generator=g)
        x[x < -1] = float("-inf")  # masked entries
        x[0, :3] = float("-inf")  # fewer than k visible
        x[1, 4] = 1.0  # ties
        assert torch.equal(kernels.kth_largest(x, k), x.topk(k, dim=-1).values[..., -1:])
