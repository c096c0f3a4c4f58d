"""Rows of packed bytes: one token's key (or value) for one KV head in a kvslim format, as vLLM's paged pool holds it.

A kvslim codec encodes ``x [..., T, d]`` into a :class:`~kvslim.quant.base.Packed` whose fields are all per token
(``[..., T, width]`` of uint8 codes, fp16 norms, fp32 scales). :class:`RowLayout` lays those fields side by side as
the raw bytes of one row, ``row_bytes = formats.bytes_per_vector(fmt, d)`` (the format's byte contract: nothing is
padded), and reads them back. A page cell of vLLM's pool is ``[key row | value row]`` (``2 * row_bytes`` bytes per
token per KV head), so the pool holds ``fp32 bytes / format bytes`` times more tokens than stock fp32.

Only formats whose rows are independent per token fit a paged pool (vLLM frees, shares and rewrites single slots):
KIVI keys share scales per 32 tokens and are refused. ``tq2.5`` / ``tq3.5`` run uncalibrated (their outlier channels
are the fixed first ``d/4`` / ``d/2``: calibration would depend on whichever request came first). ``int8`` is this
plugin's own per-token layout (:class:`Int8Codec`: symmetric codes + one fp32 scale, ``d + 4`` bytes).

:func:`paged_attention` is the attention the backend runs over such a pool. Its pure-torch path (any device): for
each request it gathers the rows of its blocks through the block table, decodes them with the codec and runs causal
SDPA in float32 (the reference the tests compare against). On CPU, decodes and short chunks of TurboQuant-MSE and fp8
rows go to kvslim's paged kernel (:func:`kvslim.quant.kernels.paged_attend`, ``kv_paged_attend`` in
``lut_kernel.c``): one call per layer for all those requests, reading the rows in place through the block table.
"""

from __future__ import annotations

import torch

from kvslim import formats
from kvslim.errors import InvalidInput
from kvslim.quant import kernels
from kvslim.quant.base import Codec, Packed
from kvslim.quant.fp8 import FP8Codec
from kvslim.quant.tq_mse import TurboQuantMSE

__all__ = ["FORMATS_REFUSED", "Int8Codec", "RowLayout", "make_codec", "paged_attention", "paged_kernel_ok",
           "supported_formats"]

# formats a codec writes whose rows are not independent per token (why, for the refusal line)
FORMATS_REFUSED = {
    "kivi2": "KIVI keys share one scale and zero point per channel per 32 tokens",
    "kivi4": "KIVI keys share one scale and zero point per channel per 32 tokens",
}
_EXTRA = ("int8",)
MAX_HEAD_SIZE = 1024  # published models: a few hundred at most; checked before a codec allocates (tq: d x d rotation)
FROM_CODES_MAX_QUERIES = 16  # query rows of one request up to which attending from the codes beats decoding


class Int8Codec(Codec):
    """Symmetric int8 per token: ``s = amax / 127``, codes ``round(x / s)`` as int8, one fp32 scale per vector.

    Bytes per vector ``d + 4``. Fields: ``codes int8 [..., T, d]``, ``scale float32 [..., T, 1]``."""

    name = "int8"
    bits_per_value = 8.0

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"int8 needs a positive integer dimension, got {dim!r}")
        self.dim = dim

    def bytes_per_vector(self) -> int:
        return self.dim + 4

    def encode(self, x: torch.Tensor) -> Packed:
        self._check(x)
        xf = x.to(torch.float32)
        amax = xf.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        codes = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
        return Packed(self.name, tuple(x.shape), x.dtype, {"codes": codes, "scale": scale})

    def decode(self, packed: Packed) -> torch.Tensor:
        self._check_packed(packed)
        f = packed.fields
        return (f["codes"].to(torch.float32) * f["scale"]).to(packed.dtype)


def supported_formats() -> tuple[str, ...]:
    """The format names the plugin stores: every per-head codec format whose rows are independent, plus int8."""
    names = [n for n in formats.codec_formats("gqa") if not formats.REGISTRY[n].append_only]
    return (*names, *_EXTRA)


def make_codec(fmt: str, head_size: int, seed: int = 0) -> Codec:
    """The codec of ``fmt`` for heads of ``head_size`` channels; ``InvalidInput`` (one line) when it cannot be used."""
    if fmt in FORMATS_REFUSED:
        raise InvalidInput(
            f"kvslim format {fmt!r} cannot live in vLLM's paged KV pool: its rows are not independent per token "
            f"({FORMATS_REFUSED[fmt]}); choose one of {', '.join(supported_formats())}"
        )
    f = formats.REGISTRY.get(fmt) if isinstance(fmt, str) else None
    if fmt != "int8" and (f is None or f.codec is None or "gqa" not in f.kinds or f.append_only):
        raise InvalidInput(f"unknown kvslim format {fmt!r} for vLLM; choose one of {', '.join(supported_formats())}")
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size > MAX_HEAD_SIZE:
        raise InvalidInput(f"kvslim format {fmt!r} cannot store this model's head size {head_size!r}: the vLLM plugin "
                           f"takes whole head sizes up to {MAX_HEAD_SIZE} (checked before a codec allocates)")  # fmt: skip
    try:
        if fmt == "int8":
            return Int8Codec(head_size)
        formats.bytes_per_vector(fmt, head_size)
        return f.make_codec(head_size, seed)
    except InvalidInput as exc:
        raise InvalidInput(f"kvslim format {fmt!r} cannot store this model's head size {head_size}: {exc}") from None


class RowLayout:
    """Byte layout of one packed row (one token, one KV head) of format ``fmt`` at head size ``head_size``.

    ``fields``: ``(name, dtype, width)`` in storage order; ``row_bytes``: their bytes, equal to the format's
    ``bytes_per_vector``. ``encode(x [..., d]) -> uint8 [..., row_bytes]``; ``decode(rows, dtype) -> [..., d]``.
    """

    def __init__(self, fmt: str, head_size: int, seed: int = 0) -> None:
        self.fmt = fmt
        self.head_size = head_size
        self.codec = make_codec(fmt, head_size, seed)
        probe = self.codec.encode(torch.zeros(1, head_size))
        if probe.grouped:
            raise InvalidInput(f"kvslim format {fmt!r} stores grouped fields; vLLM's pool needs per-token rows")
        self.fields: list[tuple[str, torch.dtype, int]] = [
            (name, t.dtype, t.shape[-1]) for name, t in probe.fields.items()
        ]
        self.row_bytes = sum(w * torch.empty((), dtype=dt).element_size() for _, dt, w in self.fields)
        expected = self.codec.bytes_per_vector()
        if self.row_bytes != expected:  # the byte contract of kvslim.formats, checked once per layout
            raise InvalidInput(f"kvslim format {fmt!r}: packed row is {self.row_bytes} B, contract says {expected} B")
        self.lossless = bool(getattr(self.codec, "lossless", False))
        self.paged = self._paged_spec()

    def _paged_spec(self) -> dict | None:
        """What the paged kernel (:func:`kvslim.quant.kernels.paged_attend`) needs to read this layout's rows in
        place: TurboQuant-MSE (codes + one fp16 norm, scored in the rotated basis) and FP8 (codes + fp32 block
        scales); None for the other codecs (they take the gather path)."""
        names = [(n, dt) for n, dt, _ in self.fields]
        nbytes = self.fields[0][2]
        if type(self.codec) is TurboQuantMSE and names == [("codes", torch.uint8), ("norm", torch.float16)]:
            c = self.codec
            return {"bits": c.bits, "lut": c.centroids, "nbytes": nbytes, "kind": 1, "nblk": 1, "blk": c.dim,
                    "rotation": c.rotation, "e4m3": False}
        if type(self.codec) is FP8Codec and names == [("codes", torch.uint8), ("scale", torch.float32)]:
            c = self.codec
            return {"bits": 8, "lut": c.table, "nbytes": nbytes, "kind": 2, "nblk": c.nblocks, "blk": c.block,
                    "rotation": None, "e4m3": True}
        return None

    def to(self, device: torch.device | str) -> RowLayout:
        if self.codec.device != torch.device(device):
            self.codec.to(device)
            self.paged = self._paged_spec()  # the codec's tables moved with it
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` (float) -> ``uint8 [..., row_bytes]``: the codec's fields, as bytes, side by side."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, 1, self.head_size)  # [N, T=1, d]: one token per row, every field per token
        packed = self.codec.encode(flat)
        parts = [packed.fields[name].reshape(flat.shape[0], w).contiguous().view(torch.uint8)
                 for name, _, w in self.fields]
        return torch.cat(parts, dim=-1).reshape(*lead, self.row_bytes)

    def packed(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> Packed:
        """``uint8 [..., T, row_bytes]`` -> the codec's :class:`Packed` ``[..., T, d]`` (fields copied out)."""
        fields, at = {}, 0
        for name, dt, w in self.fields:
            nb = w * torch.empty((), dtype=dt).element_size()
            fields[name] = rows[..., at:at + nb].contiguous().view(dt)
            at += nb
        return Packed(self.codec.name, (*rows.shape[:-1], self.head_size), dtype, fields)

    def decode(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``uint8 [..., row_bytes]`` -> ``[..., d]`` in ``dtype`` through the codec's own decode."""
        lead = rows.shape[:-1]
        return self.codec.decode(self.packed(rows.reshape(-1, 1, self.row_bytes), dtype)).reshape(*lead, self.head_size)


def write_slots(cache: torch.Tensor, layout: RowLayout, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Encode ``key`` / ``value`` ``[T, H, d]`` and store them at ``slot_mapping [T]`` (``block * block_size +
    offset``; negative = padding, skipped) of ``cache`` (uint8 ``[blocks, H, block_size, 2 * row_bytes]``)."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    key, value = key[:n], value[:n]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    t, h = key.shape[0], key.shape[1]
    rows = layout.encode(torch.stack([key, value], dim=2)).reshape(t, h, 2 * layout.row_bytes)  # [T, H, 2R]: one encode
    bs = cache.shape[2]
    slots = slot_mapping.to(torch.long)
    cache[slots // bs, :, slots % bs, :] = rows


def gather_rows(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """The packed cells ``uint8 [H, length, 2 * row_bytes]`` of one request through its block-table row."""
    bs = cache.shape[2]
    nblk = -(-length // bs)
    pages = cache.index_select(0, blocks[:nblk].to(torch.long))  # [n, H, bs, 2R]
    return pages.permute(1, 0, 2, 3).reshape(cache.shape[1], nblk * bs, cache.shape[3])[:, :length]


def gather_tokens(cache: torch.Tensor, layout: RowLayout, blocks: torch.Tensor, length: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[H, length, d]`` of one request: its ``blocks`` (block-table row) read and decoded."""
    rows = gather_rows(cache, blocks, length)
    r = layout.row_bytes
    return layout.decode(rows[..., :r], dtype), layout.decode(rows[..., r:], dtype)


def _from_codes(q: torch.Tensor, rows: torch.Tensor, layout: RowLayout, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """Attention of ``q [H, Q, d]`` (float32) over packed ``rows [H, L, 2R]`` without decoding them: the codec's
    ``score_f32`` / ``mix_f32`` (kvslim's compiled lookup kernel on CPU) read the codes."""
    r = layout.row_bytes
    s = layout.codec.score_f32(q, layout.packed(rows[..., :r])) * scale  # [H, Q, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return layout.codec.mix_f32(torch.softmax(s, dim=-1), layout.packed(rows[..., r:]))


def _decodes_from_codes(query: torch.Tensor, cache: torch.Tensor, layout: RowLayout, block_table: torch.Tensor,
                        lens: list[int], qsl: list[int], reqs: list[int], scale: float, out: torch.Tensor) -> None:
    """Requests ``reqs`` (one query each, the last of their ``lens[i]`` tokens) as one batch: their pages gathered
    to the longest one's length, rows past a request's length zeroed (finite codes) and masked out."""
    hkv, bs = cache.shape[1], cache.shape[2]
    hq, d = query.shape[1], query.shape[2]
    idx = torch.tensor(reqs, dtype=torch.long, device=block_table.device)
    lengths = torch.tensor([lens[i] for i in reqs], device=cache.device)
    lmax = max(lens[i] for i in reqs)
    nblk = -(-lmax // bs)
    pages = cache[block_table.index_select(0, idx)[:, :nblk].long()]  # [R, nblk, H, bs, 2R]
    rows = pages.permute(0, 2, 1, 3, 4).reshape(len(reqs), hkv, nblk * bs, cache.shape[3])[:, :, :lmax]
    valid = torch.arange(lmax, device=cache.device)[None, :] < lengths[:, None]  # [R, L]
    if not bool(valid.all()):
        rows = rows.masked_fill(~valid[:, None, :, None], 0)
    q = query[[qsl[i] for i in reqs]].to(torch.float32).reshape(len(reqs), hkv, hq // hkv, d)
    r = layout.row_bytes
    s = layout.codec.score_f32(q, layout.packed(rows[..., :r])) * scale  # [R, H, group, L]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = layout.codec.mix_f32(torch.softmax(s, dim=-1), layout.packed(rows[..., r:]))  # [R, H, group, d]
    out[[qsl[i] for i in reqs]] = o.reshape(len(reqs), hq, d).to(out.dtype)


def _paged_from_codes(query: torch.Tensor, cache: torch.Tensor, layout: RowLayout, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, qsl: list[int], reqs: list[int],
                      scale: float, out: torch.Tensor) -> None:
    """Requests ``reqs`` in one call of kvslim's paged kernel: it walks each request's blocks in place (no gather
    copy), scores, softmaxes and mixes all heads of all the requests from the codes."""
    spec = layout.paged
    hq = query.shape[1]
    q = query.to(torch.float32)
    rot = spec["rotation"]
    if rot is not None:  # TurboQuant scores in the rotated basis: <q, x~> = n <Pi q, c[idx]>
        q = rot.forward(q)
    q = q.contiguous()
    o = torch.empty_like(q)
    r = layout.row_bytes
    kernels.paged_attend(q, cache, block_table, seq_lens, query_start_loc, torch.tensor(reqs, dtype=torch.int32),
                         hq // cache.shape[1], spec["bits"], spec["lut"], spec["nbytes"], spec["kind"],
                         spec["nbytes"], spec["nblk"], spec["blk"], r, scale, o, spec["e4m3"])  # fmt: skip
    if sum(qsl[i + 1] - qsl[i] for i in reqs) == query.shape[0]:  # every row of the step (a decode-only step)
        out.copy_(rot.inverse(o) if rot is not None else o)
        return
    rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in reqs])
    o = o.index_select(0, rows)
    out[rows] = (rot.inverse(o) if rot is not None else o).to(out.dtype)


def paged_kernel_ok(layout: RowLayout, cache: torch.Tensor) -> bool:
    """True where :func:`paged_attention` can run kvslim's paged kernel: a TurboQuant-MSE or FP8 layout, a CPU pool
    with unit byte stride, and the compiled kernel available (not ``KVSLIM_KERNELS=0``)."""
    return (layout.paged is not None and cache.device.type == "cpu" and cache.dim() == 4 and cache.stride(3) == 1
            and kernels.available())  # fmt: skip


def paged_attention(query: torch.Tensor, cache: torch.Tensor, layout: RowLayout, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, from_codes: bool = False, paged: bool = True) -> torch.Tensor:
    """Causal attention of ``query [T, Hq, d]`` over each request's cached tokens, in float32.

    Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its newest tokens: the last of them
    sits at position ``seq_lens[i] - 1``) and its first ``seq_lens[i]`` cached tokens (written already, this step's
    included) through ``block_table[i]``. Chunked prefill, prefix-cache hits and decode are all this one case.
    ``from_codes``: codecs with ``attends_from_codes`` (TurboQuant, fp8) score and mix straight from the codes
    instead of decoding K/V first, for requests with at most ``FROM_CODES_MAX_QUERIES`` query rows in this step
    (decodes, short chunks); longer chunks decode once and run SDPA, which is faster there (tq4, 1k cached tokens,
    one thread: 1 query 0.45 ms from the codes against 11 ms decoding; 512 queries 330 ms against 92 ms). Where
    :func:`paged_kernel_ok` (TurboQuant-MSE / FP8 rows on CPU with the compiled kernel, and ``paged``), those
    requests all go to one call of kvslim's paged kernel (:func:`kvslim.quant.kernels.paged_attend`: the pages
    walked in place through the block table); otherwise the one-query requests (decodes) go in one batched call of
    the codec's ``score_f32`` / ``mix_f32`` over their gathered pages (:func:`_decodes_from_codes`) and the others
    one by one (:func:`_from_codes`). The same sums, in another order.
    Returns ``out`` (``[T, Hq, d]``, allocated in ``query``'s dtype when not given)."""
    codes = from_codes and layout.codec.attends_from_codes
    hq, d = query.shape[1], query.shape[2]
    hkv = cache.shape[1]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(query)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    done: set[int] = set()
    if codes and paged and paged_kernel_ok(layout, cache):
        short = [i for i, n in enumerate(lens) if n > 0 and 0 < qsl[i + 1] - qsl[i] <= FROM_CODES_MAX_QUERIES]
        if short:
            _paged_from_codes(query, cache, layout, block_table, seq_lens, query_start_loc, qsl, short, scale, out)
            done = set(short)
    else:
        single = [i for i, n in enumerate(lens) if n > 0 and qsl[i + 1] - qsl[i] == 1] if codes else []
        if len(single) > 1:  # every one-query request (decodes) in one from-codes call
            _decodes_from_codes(query, cache, layout, block_table, lens, qsl, single, scale, out)
            done = set(single)
    for i, length in enumerate(lens):
        qs, qe = qsl[i], qsl[i + 1]
        n = qe - qs
        if n <= 0 or length <= 0 or i in done:
            continue
        q = query[qs:qe].to(torch.float32).transpose(0, 1).reshape(hkv, group, n, d)
        if n == 1:
            mask = None
        else:
            pos = torch.arange(length - n, length, device=query.device)[:, None]
            mask = torch.arange(length, device=query.device)[None, :] <= pos  # [n, L]
        if codes and n <= FROM_CODES_MAX_QUERIES:
            o = _from_codes(q.reshape(hkv, group * n, d), gather_rows(cache, block_table[i], length), layout,
                            None if mask is None else mask.repeat(group, 1), scale)
            out[qs:qe] = o.reshape(hq, n, d).transpose(0, 1).to(out.dtype)
            continue
        k, v = gather_tokens(cache, layout, block_table[i], length)  # [Hkv, L, d] float32
        kx = k[:, None].expand(hkv, group, length, d)
        vx = v[:, None].expand(hkv, group, length, d)
        o = torch.nn.functional.scaled_dot_product_attention(q, kx, vx, attn_mask=mask, scale=scale)
        out[qs:qe] = o.reshape(hq, n, d).transpose(0, 1).to(out.dtype)
    return out
