"""kvslim's vLLM backend classes without an engine: page sizing from customize_spec, and the impl's KV update +
forward (vLLM's calling convention: flat [T, H * d] query and output buffers) equal to decode + SDPA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM is not installed here: `make vllm` builds .venv-vllm")

from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

import kvslim.vllm as plugin  # noqa: E402
from kvslim import formats  # noqa: E402
from kvslim.vllm.backend import KvslimAttentionBackend, KvslimAttentionImpl, KvslimMetadata  # noqa: E402

pytestmark = pytest.mark.vllm
D = 64


@pytest.fixture
def select(monkeypatch):
    def pick(fmt: str) -> None:
        monkeypatch.setitem(plugin._state, "format", fmt)

    return pick


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8", "tq4", "tq3", "int8"])
def test_page_bytes_are_the_format_bytes(select, fmt):
    select(fmt)
    stock = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=D, dtype=torch.float32)
    spec = KvslimAttentionBackend.customize_spec(stock)
    row = D + 4 if fmt == "int8" else formats.bytes_per_vector(fmt, D)
    assert spec.dtype == torch.uint8
    assert spec.page_size_bytes == 128 * 3 * 2 * row
    assert stock.page_size_bytes == 128 * 3 * 2 * 4 * D


@pytest.mark.parametrize("fmt, decode", [("fp32", "0"), ("tq4", "0"), ("tq4", "1"), ("tq3", "0"), ("fp8", "0")])
def test_impl_update_and_forward_equal_decode_then_sdpa(select, monkeypatch, fmt, decode):
    """decode "0": TurboQuant / fp8 attend from the codes (the default); "1": rows decoded first."""
    select(fmt)
    monkeypatch.setenv("KVSLIM_VLLM_DECODE", decode)
    torch.manual_seed(1)
    hq, hkv, bs = 9, 3, 32
    impl = KvslimAttentionImpl(num_heads=hq, head_size=D, scale=D ** -0.5, num_kv_heads=hkv)
    spec = KvslimAttentionBackend.customize_spec(
        FullAttentionSpec(block_size=bs, num_kv_heads=hkv, head_size=D, dtype=torch.float32))
    cache = torch.zeros(8, hkv, bs, spec.state_content_size_bytes, dtype=torch.uint8)
    # request 0: 40 tokens cached in blocks 5, 2; this step 3 more (a chunk). request 1: 1 token cached + 1 decode.
    table = torch.tensor([[5, 2, 0], [7, 0, 0]], dtype=torch.int32)
    k = [torch.randn(43, hkv, D), torch.randn(2, hkv, D)]
    v = [torch.randn(43, hkv, D), torch.randn(2, hkv, D)]

    def slots(i, a, b):
        pos = torch.arange(a, b)
        return table[i, pos // bs].long() * bs + pos % bs

    impl.do_kv_cache_update(None, k[0][:40], v[0][:40], cache, slots(0, 0, 40))
    impl.do_kv_cache_update(None, k[1][:1], v[1][:1], cache, slots(1, 0, 1))
    key = torch.cat([k[0][40:], k[1][1:]])
    val = torch.cat([v[0][40:], v[1][1:]])
    impl.do_kv_cache_update(None, key, val, cache, torch.cat([slots(0, 40, 43), slots(1, 1, 2)]))
    q = torch.randn(4, hq * D)
    output = torch.full((6, hq * D), float("nan"))  # two padding rows vLLM leaves alone
    meta = KvslimMetadata(num_actual_tokens=4, query_start_loc=torch.tensor([0, 3, 4]),
                          seq_lens=torch.tensor([43, 2]), block_table=table, slot_mapping=torch.empty(0))
    impl.forward(None, torch.cat([q, torch.zeros(2, hq * D)]), None, None, cache, meta, output)
    codec = impl.layout.codec
    for i, (a, b, n) in enumerate([(0, 3, 43), (3, 4, 2)]):
        kk = codec.decode(codec.encode(k[i])).repeat_interleave(3, dim=1).transpose(0, 1)
        vv = codec.decode(codec.encode(v[i])).repeat_interleave(3, dim=1).transpose(0, 1)
        qq = q[a:b].view(b - a, hq, D).transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(n - (b - a), n)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=D ** -0.5)
        torch.testing.assert_close(output[a:b].view(b - a, hq, D), ref.transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.isnan(output[4:]).all()
