"""The codec interface and the packed container every codec returns.

A codec turns float vectors ``x [..., T, d]`` (any leading axes; float16 / bfloat16 / float32 / float64) into a
:class:`Packed`: a few tensors whose bytes are exactly the stored representation (bit-packed ``uint8`` codes plus
fp16/fp32 norms or scales). ``decode`` gives back ``[..., T, d]`` in the input's dtype. Packed objects of one codec
concatenate along the token axis (``Packed.cat`` / ``codec.cat``) without re-encoding, so a cache can append.

Every field tensor has the shape ``leading + (rows, width)`` where ``rows`` runs along the token axis: ``T`` for
per-token fields, ``T / group`` for per-group fields (KIVI key scales; listed in ``Packed.grouped``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kvslim.errors import InvalidInput

__all__ = ["Packed", "Codec", "check_input", "check_query", "check_weights"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Packed:
    """Stored form of a batch of vectors.

    Attributes:
        codec: name of the codec that wrote it (``"tq3"``, ``"fp8"``...).
        shape: the logical shape ``[..., T, d]`` of what ``decode`` returns.
        dtype: dtype ``decode`` returns (the encoded input's dtype).
        fields: name -> tensor; all bytes held (``nbytes``) are in here.
        grouped: names of fields whose token axis has one row per ``group`` tokens.
        group: tokens per row of the grouped fields (1 when there are none).
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fields: dict[str, torch.Tensor]
    grouped: tuple[str, ...] = field(default=())
    group: int = 1

    @property
    def tokens(self) -> int:
        return self.shape[-2] if len(self.shape) >= 2 else 1

    @property
    def device(self) -> torch.device:
        return next(iter(self.fields.values())).device

    def nbytes(self) -> int:
        """Exact bytes of the tensors held (codes + norms/scales)."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def to(self, device: torch.device | str) -> Packed:
        return replace(self, fields={k: v.to(device) for k, v in self.fields.items()})

    def slice_tokens(self, start: int, stop: int) -> Packed:
        """Tokens ``[start, stop)`` (for grouped fields both ends must fall on group boundaries)."""
        if len(self.shape) < 2:
            raise InvalidInput("a packed single vector has no token axis to slice")
        if self.grouped and (start % self.group or (stop % self.group and stop != self.tokens)):
            raise InvalidInput(f"{self.codec} stores scales per {self.group} tokens; slice on multiples of {self.group}")
        out = {}
        for k, v in self.fields.items():
            if k in self.grouped:
                out[k] = v[..., start // self.group : -(-stop // self.group), :]
            else:
                out[k] = v[..., start:stop, :]
        n = len(range(*slice(start, stop).indices(self.tokens)))
        return replace(self, shape=(*self.shape[:-2], n, self.shape[-1]), fields=out)

    def select_tokens(self, index: torch.Tensor) -> Packed:
        """Gather tokens ``index`` (int64 ``[K]``) along the token axis, e.g. the top-k entries a selector picked."""
        if self.grouped:
            raise InvalidInput(f"{self.codec} keys share scales per {self.group} tokens; gather decoded tokens instead")
        if len(self.shape) < 2:
            raise InvalidInput("a packed single vector has no token axis to select from")
        index = index.to(device=self.device, dtype=torch.long)
        out = {k: v.index_select(-2, index) for k, v in self.fields.items()}
        return replace(self, shape=(*self.shape[:-2], index.numel(), self.shape[-1]), fields=out)

    @staticmethod
    def cat(parts: list[Packed]) -> Packed:
        """Concatenate along the token axis (axis -2 of the logical shape); no re-encoding."""
        if not parts:
            raise InvalidInput("Packed.cat needs at least one packed part")
        first = parts[0]
        for p in parts[1:]:
            if p.codec != first.codec or p.shape[:-2] != first.shape[:-2] or p.shape[-1] != first.shape[-1]:
                raise InvalidInput(
                    f"cannot concatenate packed {p.codec} {list(p.shape)} onto {first.codec} {list(first.shape)}: "
                    "codec, leading axes and dimension must match"
                )
            if p.dtype != first.dtype or p.device != first.device:
                raise InvalidInput("cannot concatenate packed parts of different dtypes or devices")
        if len(first.shape) < 2:
            raise InvalidInput("packed single vectors (shape [d]) have no token axis; encode [..., T, d] tensors")
        if first.grouped:
            for p in parts[:-1]:
                if p.tokens % first.group:
                    raise InvalidInput(f"{first.codec}: only the last part may end inside a group of {first.group}")
        fields = {k: torch.cat([p.fields[k] for p in parts], dim=-2) for k in first.fields}
        t = sum(p.tokens for p in parts)
        return replace(first, shape=(*first.shape[:-2], t, first.shape[-1]), fields=fields)


def _describe_nonfinite(x: torch.Tensor, what: str) -> str:
    parts = []
    for label, mask in (("NaN", torch.isnan(x)), ("+inf", torch.isposinf(x)), ("-inf", torch.isneginf(x))):
        n = int(mask.sum())
        if n:
            first = tuple(int(i) for i in mask.nonzero()[0].tolist())
            parts.append(f"{n} {label} (first at index {first})")
    return f"{what} has non-finite values: " + ", ".join(parts) + "; quantization needs finite input"


def all_finite(x: torch.Tensor) -> bool:
    """True when every value of the floating tensor ``x`` is finite: one min/max reduction (NaN propagates into
    both, an infinity into one), about ten times cheaper on CPU than ``torch.isfinite(x).all()``."""
    if not x.numel():
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_input(x: torch.Tensor, dim: int, codec: str, device: torch.device, what: str = "input") -> None:
    """Validate a tensor to encode: a floating tensor ``[..., dim]``, finite, on the codec's device."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInput(f"{codec}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise InvalidInput(f"{codec}: {what} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != dim:
        raise InvalidInput(f"{codec}: {what} must have last axis {dim}, got shape {list(x.shape)}")
    if x.device.type != torch.device(device).type:
        raise InvalidInput(f"{codec}: {what} is on {x.device} but the codec state is on {device}; use codec.to(...)")
    if not all_finite(x):
        raise InvalidInput(f"{codec}: " + _describe_nonfinite(x, what))


def check_query(q: torch.Tensor, packed: Packed, dim: int, codec: str) -> None:
    """Validate queries against stored codes: same dtype and device as the encoded input, last axis ``dim``."""
    if not isinstance(q, torch.Tensor) or q.dtype not in _FLOATS:
        raise InvalidInput(f"{codec}: queries must be a floating torch.Tensor")
    if q.shape[-1] != dim or q.ndim < 2:
        raise InvalidInput(f"{codec}: queries must have shape [..., Q, {dim}], got {list(q.shape)}")
    if q.device != packed.device:
        raise InvalidInput(f"{codec}: queries are on {q.device} but the codes are on {packed.device}")
    if q.dtype != packed.dtype:
        raise InvalidInput(f"{codec}: queries are {q.dtype} but the codes were encoded from {packed.dtype}; cast q")
    if not all_finite(q):
        raise InvalidInput(f"{codec}: " + _describe_nonfinite(q, "queries"))


def check_weights(w: torch.Tensor, packed: Packed, codec: str) -> None:
    """Validate mixing weights ``[..., Q, T]`` against packed ``[..., T, d]``: floating, same device, T matches."""
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise InvalidInput(f"{codec}: weights must be a floating torch.Tensor")
    if w.ndim < 2 or w.shape[-1] != packed.tokens:
        raise InvalidInput(f"{codec}: weights must have shape [..., Q, {packed.tokens}], got {list(w.shape)}")
    if w.device != packed.device:
        raise InvalidInput(f"{codec}: weights are on {w.device} but the codes are on {packed.device}")
    if not all_finite(w):
        raise InvalidInput(f"{codec}: " + _describe_nonfinite(w, "weights"))


class Codec:
    """Base class: ``encode``, ``decode``, ``nbytes``, ``state_nbytes``, ``score``, ``cat``.

    Class attributes of every codec: ``name``, ``dim``, ``bits_per_value`` (nominal code bits per coordinate, for
    display), ``lossless`` (True only for the plain float codecs, which round to their storage dtype and nothing
    else), ``has_fast_score`` (``score`` works from the codes rather than decode-then-matmul),
    ``attends_from_codes`` (the capability a cache reads: ``score_f32`` / ``mix_f32`` work from the codes and are at
    least as fast as decoding first, so attention over stored vectors calls them instead of ``decode``).
    """

    name: str = ""
    dim: int = 0
    bits_per_value: float = 0.0
    lossless: bool = False
    has_fast_score: bool = False
    attends_from_codes: bool = False
    device: torch.device = torch.device("cpu")

    # -- to implement -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Packed:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, packed: Packed) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bytes_per_vector(self) -> float:  # pragma: no cover - abstract
        """Stored bytes per vector from the byte contract (amortised for per-group scales)."""
        raise NotImplementedError

    def _state_tensors(self) -> list[torch.Tensor]:
        return []

    # -- shared -------------------------------------------------------------------------------------------------
    def state_nbytes(self) -> int:
        """Bytes of per-codec constants shared by all vectors (rotations, sketch matrix, codebooks, channel ids)."""
        return sum(t.numel() * t.element_size() for t in self._state_tensors())

    def nbytes(self, packed: Packed) -> int:
        """Exact bytes of the tensors held by ``packed``."""
        self._check_packed(packed)
        return packed.nbytes()

    def cat(self, parts: list[Packed]) -> Packed:
        for p in parts:
            self._check_packed(p)
        return Packed.cat(parts)

    def score(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Inner products ``q @ x~^T``: ``q [..., Q, d]`` against packed ``[..., T, d]`` -> ``[..., Q, T]``
        (validated, in ``q``'s dtype; computed by :meth:`score_f32`)."""
        self._check_packed(packed)
        check_query(q, packed, self.dim, self.name)
        return self.score_f32(q.to(torch.float32), packed).to(q.dtype)

    def weighted_sum(self, w: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Attention-style mix ``w @ x~``: weights ``w [..., Q, T]`` over packed ``[..., T, d]`` -> ``[..., Q, d]``
        (validated, in ``w``'s dtype; computed by :meth:`mix_f32`)."""
        self._check_packed(packed)
        check_weights(w, packed, self.name)
        return self.mix_f32(w.to(torch.float32), packed).to(w.dtype)

    def score_f32(self, q: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Unvalidated :meth:`score` in float32: ``q [..., Q, d]`` float32 -> ``[..., Q, T]`` float32. The base
        decodes then multiplies; codecs with ``attends_from_codes`` work from the codes."""
        return q @ self.decode(packed).to(torch.float32).transpose(-1, -2)

    def mix_f32(self, w: torch.Tensor, packed: Packed) -> torch.Tensor:
        """Unvalidated :meth:`weighted_sum` in float32: ``w [..., Q, T]`` float32 -> ``[..., Q, d]`` float32."""
        return w @ self.decode(packed).to(torch.float32)

    def to(self, device: torch.device | str) -> Codec:
        """Move the codec's constants (and sub-codecs / rotations) to ``device``; returns ``self``."""
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
            elif isinstance(v, Codec) or (hasattr(v, "to") and hasattr(v, "state_nbytes")):
                v.to(device)
        self.device = torch.device(device)
        return self

    def calibrate(self, x: torch.Tensor) -> Codec:
        """Fit data-dependent choices (only the fractional TurboQuant rates have any); returns ``self``."""
        return self

    @property
    def effective_bits(self) -> float:
        """Stored bits per coordinate including norms/scales (``8 * bytes_per_vector / d``)."""
        return 8.0 * self.bytes_per_vector() / self.dim

    def _check_packed(self, packed: Packed) -> None:
        if not isinstance(packed, Packed):
            raise InvalidInput(f"{self.name}: expected a Packed object, got {type(packed).__name__}")
        if packed.codec != self.name or packed.shape[-1] != self.dim:
            raise InvalidInput(
                f"{self.name} (d={self.dim}) cannot read packed data written by {packed.codec} (d={packed.shape[-1]})"
            )

    def _check(self, x: torch.Tensor, what: str = "input") -> None:
        check_input(x, self.dim, self.name, self.device, what)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"
