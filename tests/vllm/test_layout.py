"""kvslim.vllm.layout without vLLM: packed rows meet the format byte contract, and paged attention over a pool of
packed rows (random block tables, chunked queries) equals the reference: the codec's own decode + causal SDPA, both
when it decodes the rows and when it attends from the codes (kvslim's compiled lookup kernel)."""

from __future__ import annotations

import pytest
import torch

from kvslim import formats
from kvslim.errors import InvalidInput
from kvslim.vllm.layout import RowLayout, make_codec, paged_attention, supported_formats, write_slots

D = 64


@pytest.mark.parametrize("fmt", supported_formats())
def test_rows_meet_the_byte_contract_and_decode_like_the_codec(fmt):
    layout = RowLayout(fmt, D)
    if fmt != "int8":
        assert layout.row_bytes == formats.bytes_per_vector(fmt, D)
    x = torch.randn(7, 3, D)
    rows = layout.encode(x)
    assert rows.dtype == torch.uint8 and rows.shape == (7, 3, layout.row_bytes)
    ref = layout.codec.decode(layout.codec.encode(x))  # the codec itself, on [.., T, d] as kvslim's caches use it
    torch.testing.assert_close(layout.decode(rows), ref, rtol=0, atol=0)
    if layout.lossless and fmt == "fp32":
        assert torch.equal(layout.decode(rows), x)


@pytest.mark.parametrize(
    "fmt, d, words",
    [("kivi2", D, ["'kivi2'", "not independent per token"]), ("kivi4", D, ["'kivi4'", "not independent"]),
     ("tq9", D, ["unknown kvslim format 'tq9'"]), ("fp8_ds_v4", 512, ["unknown kvslim format 'fp8_ds_v4'"]),
     ("tq2.5", 62, ["'tq2.5'", "head size 62"]), ("tq4", 2, ["'tq4'", "head size 2"])],
)
def test_refusals_are_one_line_naming_the_format(fmt, d, words):
    with pytest.raises(InvalidInput) as exc:
        make_codec(fmt, d)
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def _reference(q, k, v, q_pos, scale):
    """Causal attention of q [n, Hq, d] at positions q_pos over k, v [L, Hkv, d] (already decoded)."""
    hq, hkv = q.shape[1], k.shape[1]
    kx = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    vx = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kx, vx, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


@pytest.mark.parametrize("fmt, from_codes", [(f, False) for f in ("fp32", "bf16", "fp8", "int8", "tq4", "tq3", "tq2.5",
                                                                   "tq3.5")]
                         + [(f, True) for f in ("fp8", "tq4", "tq3", "tq2.5", "tq3.5")])
def test_paged_attention_equals_decode_then_sdpa(fmt, from_codes, monkeypatch):
    """Five requests in one step: three decodes (1 query; from the codes they run as one batch), a chunked-prefill
    continuation (5 queries after 37 cached tokens, as after a prefix-cache hit) and a first chunk (9 queries);
    slots scattered over shuffled blocks."""
    monkeypatch.setattr("kvslim.vllm.layout.FROM_CODES_MAX_QUERIES", 4)  # the 9-query chunk decodes, the rest not
    torch.manual_seed(0)
    hq, hkv, bs, nblocks = 6, 2, 16, 24
    layout = RowLayout(fmt, D)
    cache = torch.zeros(nblocks, hkv, bs, 2 * layout.row_bytes, dtype=torch.uint8)
    lens, news = [50, 42, 9, 20, 3], [1, 5, 9, 1, 1]
    perm = torch.randperm(nblocks)
    table = torch.zeros(len(lens), 4, dtype=torch.int32)
    at = 0
    for i, n in enumerate(lens):
        need = -(-n // bs)
        table[i, :need] = perm[at:at + need]
        at += need
    keys = [torch.randn(n, hkv, D) for n in lens]
    vals = [torch.randn(n, hkv, D) for n in lens]

    def slots(i, start, stop):
        pos = torch.arange(start, stop)
        return table[i, pos // bs].long() * bs + pos % bs

    for i, n in enumerate(lens):  # what earlier steps wrote
        write_slots(cache, layout, keys[i][: n - news[i]], vals[i][: n - news[i]], slots(i, 0, n - news[i]))
    # this step: the new tokens of all requests in one batch, with one padding slot (-1) at the end
    k_new = torch.cat([keys[i][n - news[i]:] for i, n in enumerate(lens)] + [torch.randn(1, hkv, D)])
    v_new = torch.cat([vals[i][n - news[i]:] for i, n in enumerate(lens)] + [torch.randn(1, hkv, D)])
    sm = torch.cat([slots(i, n - news[i], n) for i, n in enumerate(lens)] + [torch.tensor([-1])])
    write_slots(cache, layout, k_new, v_new, sm)

    qsl = torch.tensor([0, 1, 6, 15, 16, 17])
    q = torch.randn(17, hq, D)
    out = paged_attention(q, cache, layout, table, torch.tensor(lens), qsl, scale=D ** -0.5, from_codes=from_codes)
    codec = layout.codec
    for i, n in enumerate(lens):
        k = codec.decode(codec.encode(keys[i].transpose(0, 1))).transpose(0, 1)
        v = codec.decode(codec.encode(vals[i].transpose(0, 1))).transpose(0, 1)
        ref = _reference(q[qsl[i]:qsl[i + 1]], k, v, torch.arange(n - news[i], n), D ** -0.5)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], ref, rtol=1e-5, atol=1e-5)
