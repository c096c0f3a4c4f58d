"""The decode-step shortcuts: a plain 16-bit store holds the bare tensor (same bytes, same checks), the grouped
masked sdpa equals the explicit softmax for head-uniform and per-KV-head masks, and decode_attention equals
rows_attention over dense, coded and pre-scored segments."""

from __future__ import annotations

import pytest
import torch

from kvslim.cache.attend import grouped_attention
from kvslim.cache.rows import Rows, Scored, decode_attention, rows_attention
from kvslim.cache.storage import Store, append_pair, make_storage_codec
from kvslim.errors import InvalidInput
from kvslim.quant import make_codec


def test_plain_store_bytes_decode_and_overflow():
    codec = make_storage_codec("fp16", 8)
    sk, sv = Store(codec, torch.float32), Store(codec, torch.float32)
    k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    append_pair(sk, sv, k, v)
    sk.append(k[:, :, :1])
    assert sk.n == 6 and sk.nbytes() == 2 * 3 * 6 * 8 * 2 and sv.nbytes() == 2 * 3 * 5 * 8 * 2
    assert torch.equal(sv.decode(), v.half().float())
    assert torch.equal(sk.decode()[:, :, :5], k.half().float())
    assert torch.equal(sk.decode_rows(torch.tensor([[[0, 5]] * 3] * 2)), torch.cat([k[:, :, :1]] * 2, 2).half().float())
    sk.drop_front(2)
    assert sk.n == 4 and torch.equal(sk.decode()[:, :, 0], k[:, :, 2].half().float())
    with pytest.raises(InvalidInput, match="overflow"):
        sk.append(torch.full((2, 3, 1, 8), 1e6))
    with pytest.raises(InvalidInput, match="non-finite"):
        append_pair(sk, sv, torch.full((2, 3, 1, 8), float("nan")), v[:, :, :1])


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_grouped_masked_sdpa_equals_explicit_softmax(heads, batch):
    g = torch.Generator().manual_seed(heads + batch)
    q, k, v = torch.randn(batch, 9, 7, 16, generator=g), torch.randn(batch, 3, 11, 16, generator=g), torch.randn(batch, 3, 11, 16, generator=g)
    mask = torch.rand(batch, heads, 7, 11, generator=g) > 0.4
    mask[..., 0] = True
    fast, _ = grouped_attention(q, k, v, mask, 0.25)
    ref, _ = grouped_attention(q, k, v, mask, 0.25, want_probs=True)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_equals_rows_attention():
    g = torch.Generator().manual_seed(0)
    codec = make_codec("tq3", 64)
    q = torch.randn(1, 9, 1, 64, generator=g)
    sinks, tail = torch.randn(1, 3, 4, 64, generator=g), torch.randn(1, 3, 30, 64, generator=g)
    bk = Rows([(codec, codec.encode(torch.randn(1, 3, 20, 64, generator=g)))], torch.float32)
    bv = Rows([(codec, codec.encode(torch.randn(1, 3, 20, 64, generator=g)))], torch.float32)
    scored = Scored(bk.score(q.reshape(1, 3, 3, 64)), 64)
    for keys in ([sinks, bk, tail], [sinks, scored, tail], [bk]):
        values = [sinks, bv, tail] if len(keys) == 3 else [bv]
        for softcap in (None, 5.0):
            ref = rows_attention(q, keys, values, None, 0.125, softcap)[0]
            torch.testing.assert_close(decode_attention(q, keys, values, 0.125, softcap), ref, rtol=1e-5, atol=1e-5)
