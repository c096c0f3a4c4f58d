"""Storage formats: how many bytes one stored vector takes (the byte contract shared by planner, codecs and caches).

A *vector* is one token's key, or value, or MLA latent, or V4 entry, or indexer key, for one KV head, of dimension
``d``. ``bytes_per_vector(fmt, d)`` is the contract every kvslim codec's packed storage must meet, and
``vectors_nbytes(fmt, d, n, role)`` the exact bytes of a stream of ``n`` such vectors (it differs from
``n * bytes_per_vector`` only for KIVI, whose newest tokens stay in fp16 and whose key scales are shared by groups of
tokens). Per-codec constants shared by all vectors (rotation signs, codebooks, outlier indices) are *not* counted here:
codecs report them as ``state_nbytes()``, once per cache layer.

| name | layout | bytes per vector of dim d |
|---|---|---|
| fp32 / fp16 / bf16 | plain | 4d / 2d / 2d |
| fp8 | e4m3 codes + one fp32 scale per block of 128 values | d + 4*ceil(d/128) |
| fp4 | e2m1 codes 2 per byte + one ue8m0 (1 B) scale per block of 32 | ceil(d/2) + ceil(d/32) |
| tq1..tq4 | TurboQuant-MSE b-bit codes packed per vector + fp16 norm | ceil(d*b/8) + 2 |
| tq2.5 | d/4 outlier channels at 3 bits + 3d/4 at 2 bits, two fp16 norms | ceil(d/4*3/8) + ceil(3d/4*2/8) + 4 |
| tq3.5 | d/2 channels at 4 bits + d/2 at 3 bits, two fp16 norms | ceil(d/2*4/8) + ceil(d/2*3/8) + 4 |
| tqprod2..4 | (b-1)-bit TQ-MSE codes + d-bit QJL signs + fp16 norm + fp16 residual norm | ceil(d(b-1)/8) + ceil(d/8) + 4 |
| kivi2 / kivi4 | key: b-bit codes + fp16 scale and zero per channel per 32 tokens | ceil(d*b/8) + d/8 (amortised) |
|  | value: b-bit codes + fp16 scale and zero per 32 channels | ceil(d*b/8) + 4*ceil(d/32) |
| fp8_ds_mla | FlashMLA V3.2 token: (d-64) e4m3 + fp32 scale per 128 + 64 bf16 RoPE | 656 at d = 576 |
| fp8_ds_v4 | FlashMLA V4 entry: (d-64) e4m3 + ue8m0 scale per 64, padded to 8 B + 64 bf16 RoPE | 584 at d = 512 |

KIVI streams (``vectors_nbytes``), after KIVI paper section 3.3 with G = 32, R = 128: keys are quantised R tokens at a
time, so ``n % R`` newest keys are fp16 and the rest quantised; values are a FIFO whose ``min(n, R)`` newest are fp16.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from .errors import InvalidInput

__all__ = [
    "FORMATS",
    "KIVI_GROUP",
    "KIVI_RESIDUAL",
    "KVFormat",
    "bytes_per_vector",
    "check_format",
    "kivi_fp16_tokens",
    "parse_kv_format",
    "vectors_nbytes",
    "weight_bytes_per_param",
]

KIVI_GROUP = 32
KIVI_RESIDUAL = 128
ROPE_DIMS = 64  # the bf16 RoPE part of DeepSeek's production layouts

FORMATS: tuple[str, ...] = (
    "fp32", "fp16", "bf16", "fp8", "fp4",
    "tq1", "tq2", "tq2.5", "tq3", "tq3.5", "tq4",
    "tqprod2", "tqprod3", "tqprod4",
    "kivi2", "kivi4",
    "fp8_ds_mla", "fp8_ds_v4",
)  # fmt: skip


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known format name, else ``InvalidInput`` naming the closest known names."""
    if fmt in FORMATS:
        return fmt
    close = difflib.get_close_matches(fmt, FORMATS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise InvalidInput(f"unknown storage format {fmt!r}: {hint}known formats are {', '.join(FORMATS)}")


def _tq_bits(fmt: str) -> float:
    return float(fmt[2:])


def bytes_per_vector(fmt: str, dim: int, role: str = "key") -> int | float:
    """Bytes one stored vector of dimension ``dim`` takes in format ``fmt`` (see the module table).

    ``role`` ("key" or "value") matters only for KIVI; the KIVI key figure is the amortised one (a float when
    ``dim`` is not a multiple of 8). Raises ``InvalidInput`` for an unknown format or a dim the format cannot take.
    """
    check_format(fmt)
    if dim <= 0:
        raise InvalidInput(f"vector dimension must be positive, got {dim}")
    d = dim
    if fmt == "fp32":
        return 4 * d
    if fmt in ("fp16", "bf16"):
        return 2 * d
    if fmt == "fp8":
        return d + 4 * math.ceil(d / 128)
    if fmt == "fp4":
        return math.ceil(d / 2) + math.ceil(d / 32)
    if fmt == "tq2.5":
        if d % 4:
            raise InvalidInput(f"tq2.5 needs a dimension divisible by 4, got {d}")
        return math.ceil(d // 4 * 3 / 8) + math.ceil(3 * d // 4 * 2 / 8) + 4
    if fmt == "tq3.5":
        if d % 2:
            raise InvalidInput(f"tq3.5 needs an even dimension, got {d}")
        return math.ceil(d // 2 * 4 / 8) + math.ceil(d // 2 * 3 / 8) + 4
    if fmt.startswith("tqprod"):
        b = int(fmt[6:])
        return math.ceil(d * (b - 1) / 8) + math.ceil(d / 8) + 4
    if fmt.startswith("tq"):
        return math.ceil(d * _tq_bits(fmt) / 8) + 2
    if fmt.startswith("kivi"):
        b = int(fmt[4:])
        if role == "key":
            amortised = 4 * d / KIVI_GROUP
            return math.ceil(d * b / 8) + (int(amortised) if amortised.is_integer() else amortised)
        if role == "value":
            return math.ceil(d * b / 8) + 4 * math.ceil(d / KIVI_GROUP)
        raise InvalidInput(f"KIVI role must be 'key' or 'value', got {role!r}")
    if fmt in ("fp8_ds_mla", "fp8_ds_v4"):
        nope = d - ROPE_DIMS
        if nope <= 0:
            raise InvalidInput(f"{fmt} needs a dimension above {ROPE_DIMS} (NoPE + 64 RoPE dims), got {d}")
        if fmt == "fp8_ds_mla":
            scales = 4 * math.ceil(nope / 128)
        else:
            scales = 8 * math.ceil(math.ceil(nope / 64) / 8)  # ue8m0 per 64 values, padded to 8 bytes
        return nope + scales + 2 * ROPE_DIMS
    raise AssertionError(f"unhandled format {fmt}")


def kivi_fp16_tokens(n: int, role: str, residual: int = KIVI_RESIDUAL) -> int:
    """How many of the ``n`` newest tokens a KIVI stream keeps in fp16: keys ``n % R``, values ``min(n, R)``."""
    if role == "key":
        return n % residual
    if role == "value":
        return min(n, residual)
    raise InvalidInput(f"KIVI role must be 'key' or 'value', got {role!r}")


def vectors_nbytes(fmt: str, dim: int, n: int, role: str = "key") -> int:
    """Exact bytes of a stream of ``n`` vectors of dimension ``dim`` in ``fmt`` (KIVI: residual tokens in fp16)."""
    if n < 0:
        raise InvalidInput(f"a token count cannot be negative, got {n}")
    if not fmt.startswith("kivi"):
        per = bytes_per_vector(fmt, dim, role)
        return int(n * per)
    b = int(fmt[4:])
    check_format(fmt)
    codes = math.ceil(dim * b / 8)
    fp = kivi_fp16_tokens(n, role)
    q = n - fp
    if role == "key":  # q is a multiple of R (hence of G): one fp16 scale + zero per channel per group of G tokens
        return q * codes + (q // KIVI_GROUP) * 4 * dim + fp * 2 * dim
    return q * (codes + 4 * math.ceil(dim / KIVI_GROUP)) + fp * 2 * dim


def weight_bytes_per_param(fmt: str) -> float:
    """Bytes per weight in ``fmt`` (fp8/fp4 with their block scales, as ``bytes_per_vector(fmt, 128) / 128``)."""
    if fmt not in ("fp32", "fp16", "bf16", "fp8", "fp4"):
        raise InvalidInput(f"weights format must be one of fp32, fp16, bf16, fp8, fp4; got {fmt!r}")
    return bytes_per_vector(fmt, 128) / 128


@dataclass(frozen=True)
class KVFormat:
    """Storage format per cached component: ``kv`` (keys/values, MLA latents, V4 entries) and ``index`` (DSA/CSA
    indexer keys). ``production`` means each model's serving layout: V3/V3.2 ``fp8_ds_mla`` + fp8 indexer, V4
    ``fp8_ds_v4`` + fp4 indexer, anything else bf16. Compressor state is always fp32 (as in DeepSeek's code)."""

    kv: str = "bf16"
    index: str = "bf16"
    production: bool = False

    def __str__(self) -> str:
        if self.production:
            return "production"
        return self.kv if self.kv == self.index else f"kv={self.kv},index={self.index}"


def parse_kv_format(text: str) -> KVFormat:
    """``bf16`` | ``fp8`` | ... (one name for every component) | ``kv=fp8_ds_v4,index=fp4`` | ``production``."""
    text = text.strip()
    if text == "production":
        return KVFormat(production=True)
    if "=" not in text:
        return KVFormat(kv=check_format(text), index=check_format(text))
    parts: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("kv", "index"):
            raise InvalidInput(f"bad --kv-format part {item!r}: use NAME, production, or kv=NAME,index=NAME")
        if key in parts:
            raise InvalidInput(f"--kv-format {text!r} gives {key}= twice: give each of kv=, index= at most once")
        parts[key] = check_format(value)
    kv = parts.get("kv", "bf16")
    return KVFormat(kv=kv, index=parts.get("index", kv))
