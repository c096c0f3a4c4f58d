"""Storage of per-token vectors through a codec, growing at the back and trimmed at the front.

A codec turns ``x [b, h, n, d]`` into a *packed* value (a tensor, or a tuple/dict of tensors whose axis 2 is the
token axis) and back. ``none`` (the compute dtype, lossless) is built here; every other name is a storage format of
:mod:`kvslim.formats`, built by ``kvslim.quant.make_codec``. Formats flagged ``append_only`` (KIVI) are held in
the streaming store the format names.

``Store`` holds one packed value per layer segment; ``append`` concatenates along tokens, ``drop_front`` slices,
``decode`` returns ``[b, h, n, d]`` in the compute dtype, ``nbytes`` counts exactly the bytes held. A plain float
format (``fp16`` / ``bf16`` / ``fp32``: a 16-bit window) is held as the bare tensor in its storage dtype - the same
bytes as its ``Packed`` value, without the per-call container work at every decode step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import REGISTRY
from ..memory import tensor_nbytes

__all__ = ["ExactCodec", "Store", "append_pair", "exact_codec", "make_storage_codec", "packed_nbytes"]

class ExactCodec:
    """Storage in the compute dtype itself (recipe codec ``none``): nothing is converted, so it is lossless."""

    name = "none"
    per_token = True

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        return packed

    def nbytes(self, packed: Any) -> int:
        return packed_nbytes(packed)

    def state_nbytes(self) -> int:
        return 0


def exact_codec(dim: int) -> ExactCodec:
    """The lossless storage of the compute dtype (sinks, and every store of a codec-``none`` recipe)."""
    return ExactCodec(dim)


def make_storage_codec(name: str, dim: int, seed: int = 0, role: str = "key") -> Any:
    """A codec for vectors of dimension ``dim`` (``role`` matters only to KIVI: keys per channel, values per token).
    ``none`` keeps the compute dtype; every other name is a format of :mod:`kvslim.formats` built by
    ``kvslim.quant.make_codec``."""
    if name == "none":
        return exact_codec(dim)
    from ..quant import make_codec

    return make_codec(name, dim, seed=seed, role=role)


def packed_nbytes(packed: Any) -> int:
    """Bytes of every tensor in a packed value (tensor, tuple/list, dict or object with tensor attributes)."""
    if packed is None:
        return 0
    if isinstance(packed, torch.Tensor):
        return tensor_nbytes(packed)
    if isinstance(packed, (tuple, list)):
        return sum(packed_nbytes(p) for p in packed)
    if isinstance(packed, dict):
        return sum(packed_nbytes(p) for p in packed.values())
    if hasattr(packed, "nbytes") and callable(packed.nbytes):
        return int(packed.nbytes())
    return sum(packed_nbytes(v) for v in vars(packed).values() if isinstance(v, (torch.Tensor, tuple, list, dict)))


def _map2(fn: Any, a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    if isinstance(a, tuple):
        return tuple(_map2(fn, x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return {k: _map2(fn, a[k], b[k]) for k in a}
    raise TypeError(f"cannot concatenate packed values of type {type(a).__name__}")


def _map1(fn: Any, a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return fn(a)
    if isinstance(a, tuple):
        return tuple(_map1(fn, x) for x in a)
    if isinstance(a, dict):
        return {k: _map1(fn, v) for k, v in a.items()}
    raise TypeError(f"cannot slice packed values of type {type(a).__name__}")


def _is_packed(p: Any) -> bool:
    return hasattr(p, "fields") and hasattr(p, "slice_tokens")


class Store:
    """Vectors ``[b, h, n, d]`` held through ``codec``; ``n`` grows by ``append`` and shrinks by ``drop_front``.

    Packed values keep the token axis second to last of every field (``kvslim.quant.Packed``) or at dim 2 (plain
    tensors), so concatenation and slicing need no re-encoding. KIVI's streaming store (fp16 residual of the
    recent tokens, groups of 32 quantized together) is used as-is for append-only stores; codecs that need
    calibration (``tq2.5``/``tq3.5`` outlier channels) are calibrated on the first tokens appended.
    """

    def __init__(self, codec: Any, out_dtype: torch.dtype) -> None:
        self.codec = codec
        self.out_dtype = out_dtype
        self.packed: Any = None
        self.n = 0
        self.stream = None
        self.plain = _plain_dtype(codec)  # a plain float format: the bare tensor in this dtype
        fmt = REGISTRY.get(getattr(codec, "name", ""))
        if fmt is not None and fmt.append_only:  # KIVI: a streaming store (fp16 residual, groups quantized together)
            self.stream = fmt.make_store(codec)

    def append(self, x: torch.Tensor) -> None:
        if x.shape[2] == 0:
            return
        self.n += x.shape[2]
        if self.stream is not None:
            self.stream.append(x)
            return
        if self.plain is not None:
            self.add(_to_plain(x, self.plain, self.codec.name))
            return
        if getattr(self.codec, "calibrated", True) is False:
            self.codec.calibrate(x.reshape(-1, x.shape[-1]).float())
        self.add(self.codec.encode(x))

    def add(self, p: Any) -> None:
        """Append an already encoded value (what ``codec.encode`` returned for the new tokens)."""
        if self.packed is None:
            self.packed = p
        elif _is_packed(p):
            self.packed = type(p).cat([self.packed, p])
        else:
            self.packed = _map2(lambda a, b: torch.cat([a, b], dim=2), self.packed, p)

    def drop_front(self, count: int) -> None:
        if count <= 0 or self.n == 0:
            return
        if self.stream is not None:
            raise RuntimeError(f"{self.codec.name} storage is append-only; windowed stores keep fp16 instead")
        count = min(count, self.n)
        if _is_packed(self.packed):
            self.packed = self.packed.slice_tokens(count, self.packed.tokens)
        else:
            self.packed = _map1(lambda a: a[:, :, count:], self.packed)
        self.n -= count

    def decode(self) -> torch.Tensor | None:
        if self.n == 0:
            return None
        if self.stream is not None:
            return self.stream.materialize().to(self.out_dtype)
        if self.plain is not None:
            return self.packed.to(self.out_dtype)
        return self.codec.decode(self.packed).to(self.out_dtype)

    def attends_from_codes(self) -> bool:
        """True when attention can read this store's packed codes directly (the codec's capability flag)."""
        return bool(getattr(self.codec, "attends_from_codes", False))

    def rows(self) -> Any:
        """The stored vectors as :class:`~kvslim.cache.rows.Rows` read from the codes (None when empty): the packed
        value, or for a streaming store its quantised prefix and its fp16 residual."""
        from .rows import Rows

        if self.n == 0:
            return None
        if self.stream is not None:
            parts = [] if self.stream.quantized is None else [(self.codec, self.stream.quantized)]
            return Rows([*parts, self.stream.recent.to(self.out_dtype)], self.out_dtype)
        return Rows([(self.codec, self.packed)], self.out_dtype)

    def can_gather(self) -> bool:
        """True when entries can be picked from the packed form before decoding (per-token packed fields)."""
        if self.plain is not None:
            return True
        return self.stream is None and _is_packed(self.packed) and not self.packed.grouped

    def decode_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Decode only entries ``idx [b, h, k]`` (per batch row and head) -> ``[b, h, k, d]``."""
        from dataclasses import replace

        p = self.packed
        b, h, k = idx.shape
        if self.plain is not None:
            return p.gather(2, idx[..., None].expand(b, h, k, p.shape[-1])).to(self.out_dtype)
        fields = {n: f.gather(2, idx[..., None].expand(b, h, k, f.shape[-1])) for n, f in p.fields.items()}
        sub = replace(p, fields=fields, shape=(b, h, k, p.shape[-1]))
        return self.codec.decode(sub).to(self.out_dtype)

    def select_batch(self, fn: Any) -> None:
        if self.stream is not None:
            if self.stream.quantized is not None:
                self.stream.quantized = _select_packed(self.stream.quantized, fn)
            if self.stream.recent is not None:
                self.stream.recent = fn(self.stream.recent)
        elif _is_packed(self.packed):
            self.packed = _select_packed(self.packed, fn)
        elif self.packed is not None:
            self.packed = _map1(fn, self.packed)

    def nbytes(self) -> int:
        if self.stream is not None:
            return int(self.stream.nbytes())
        if self.plain is not None:
            return packed_nbytes(self.packed)
        return 0 if self.packed is None else int(self.codec.nbytes(self.packed))


_PLAIN = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_FP16_MAX = 65504.0


def _plain_dtype(codec: Any) -> torch.dtype | None:
    """The storage dtype of a plain float codec (``fp16`` / ``bf16`` / ``fp32``), else None."""
    fmt = REGISTRY.get(getattr(codec, "name", ""))
    if fmt is None or not fmt.lossless or fmt.codec is None or fmt.append_only:
        return None
    return _PLAIN.get(codec.name)


def _to_plain(x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``x`` in the storage dtype (a copy); ``InvalidInput`` on non-finite input or float16 overflow (the checks of
    ``PlainCodec.encode``, in one reduction)."""
    from ..errors import InvalidInput

    top = float(x.abs().amax()) if x.numel() else 0.0
    if not top < float("inf"):  # NaN fails too
        raise InvalidInput(f"{name}: input has non-finite values; storage needs finite input")
    if dtype == torch.float16 and top > _FP16_MAX:
        raise InvalidInput(f"{name}: values up to {top:.4g} overflow float16 storage")
    return x.to(dtype, copy=True)


def _select_packed(p: Any, fn: Any) -> Any:
    from dataclasses import replace

    fields = {k: fn(v) for k, v in p.fields.items()}
    b = next(iter(fields.values())).shape[0]
    return replace(p, fields=fields, shape=(b, *p.shape[1:]))


def append_pair(sk: Store, sv: Store, k: torch.Tensor, v: torch.Tensor) -> None:
    """Append keys ``k`` and values ``v`` ``[b, h, n, d]``; when both stores share one codec whose format encodes
    each vector on its own (``chunk_invariant``), one ``encode`` of both stacked (the same bytes as two: a decode
    step pays each codec call's fixed cost once)."""
    if sk.plain is not None and sv.plain == sk.plain and k.shape == v.shape and k.shape[2]:
        both = _to_plain(torch.stack([k, v]), sk.plain, sk.codec.name)  # one conversion and one check
        for i, store in enumerate((sk, sv)):
            store.n += k.shape[2]
            store.add(both[i])
        return
    fmt = REGISTRY.get(getattr(sk.codec, "name", ""))
    if (sk.codec is not sv.codec or sk.plain is not None or fmt is None or fmt.codec is None or not fmt.chunk_invariant or fmt.append_only
            or fmt.calibrated or k.shape != v.shape or k.shape[2] == 0):  # fmt: skip
        sk.append(k)
        sv.append(v)
        return
    from dataclasses import replace

    p = sk.codec.encode(torch.stack([k, v]))
    for i, store in enumerate((sk, sv)):
        store.n += k.shape[2]
        store.add(replace(p, shape=p.shape[1:], fields={n: f[i] for n, f in p.fields.items()}))
