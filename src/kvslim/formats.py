"""Storage formats: the one registry of how vectors are stored, what one stored vector costs, and which codec stores it.

A *vector* is one token's key, or value, or MLA latent, or V4 entry, or indexer key, for one KV head, of dimension
``d``. Each :class:`Format` declares its bytes-per-vector formula (the contract every codec's packed storage meets),
its flags and its codec factory; the recipes (``kvslim.cache.recipe.CODECS``), the codecs (``kvslim.quant.CODEC_NAMES``,
``make_codec``), the planner, the compressed caches and ``kvslim.nn``'s packed V4 storage all read :data:`REGISTRY`.
Per-codec constants shared by all vectors (rotation signs, codebooks, outlier indices) are *not* counted here:
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

Flags: ``lossless`` (exact for inputs in the storage dtype), ``append_only`` (stored as a stream that can only
grow: KIVI's key scales are shared by groups of tokens, so a sliding window cannot drop its oldest tokens),
``calibrated`` (fitted to the first vectors stored: never shared between layers or streams), ``chunk_invariant``
(encoding a vector does not depend on the vectors stored with it, so chunked prefill stores what one-shot stores).

KIVI streams (``vectors_nbytes``), after KIVI paper section 3.3 with G = 32, R = 128: keys are quantised R tokens at a
time, so ``n % R`` newest keys are fp16 and the rest quantised; values are a FIFO whose ``min(n, R)`` newest are fp16.
This module imports nothing heavy: codec factories are ``"module:function"`` paths resolved on first use.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import InvalidInput

__all__ = [
    "FORMATS",
    "KIVI_GROUP",
    "KIVI_RESIDUAL",
    "REGISTRY",
    "Format",
    "KVFormat",
    "bytes_per_vector",
    "check_format",
    "codec_formats",
    "get_format",
    "kivi_fp16_tokens",
    "parse_kv_format",
    "register_format",
    "vectors_nbytes",
    "weight_bytes_per_param",
]

KIVI_GROUP = 32
KIVI_RESIDUAL = 128
ROPE_DIMS = 64  # the bf16 RoPE part of DeepSeek's production layouts


@dataclass(frozen=True)
class Format:
    """One storage format.

    ``bytes(d, role)`` is the bytes-per-vector formula (raise ``InvalidInput`` for a dim the format cannot take);
    ``stream_nbytes(d, n, role)``, when set, the exact bytes of a stream of ``n`` vectors (else ``n * bytes``).
    ``codec`` is ``"module:function"``, the factory ``function(name, dim, seed, **options) -> Codec`` (``None``:
    a layout the planner prices but no codec writes); ``store`` (append-only formats) ``"module:Class"`` of the
    streaming store a cache keeps. ``kinds``: the layer kinds it fits (``gqa`` separate K and V per head, ``mla``
    latents, ``v4`` shared K=V entries); ``index``: usable for indexer keys; ``per_role``: keys and values are encoded differently (one codec each).
    """

    name: str
    description: str
    bytes: Callable[[int, str], int | float]
    codec: str | None = None
    lossless: bool = False
    append_only: bool = False
    calibrated: bool = False
    chunk_invariant: bool = True
    kinds: tuple[str, ...] = ("gqa", "mla", "v4")
    index: bool = True
    per_role: bool = False
    stream_nbytes: Callable[[int, int, str], int] | None = None
    store: str | None = None

    def make_codec(self, dim: int, seed: int = 0, **options) -> object:
        """The codec for vectors of dimension ``dim`` (``InvalidInput`` when the format has none)."""
        if self.codec is None:
            raise InvalidInput(f"{self.name} is a layout the planner prices; no kvslim codec writes it")
        return _resolve(self.codec)(self.name, dim, seed, **options)

    def make_store(self, codec: object) -> object:
        """The streaming store of an append-only format."""
        return _resolve(self.store)(codec)


def _resolve(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _tq(bits: float) -> Callable[[int, str], int]:
    return lambda d, role: math.ceil(d * bits / 8) + 2


def _split(name: str, hi: int, lo: int, share: int) -> Callable[[int, str], int]:
    def per(d: int, role: str) -> int:
        if d % share:
            raise InvalidInput(f"{name} puts d/{share} channels at {hi} bits; d={d} is not divisible by {share}")
        return math.ceil(d // share * hi / 8) + math.ceil((share - 1) * d // share * lo / 8) + 4

    return per


def _tqprod(bits: int) -> Callable[[int, str], int]:
    return lambda d, role: math.ceil(d * (bits - 1) / 8) + math.ceil(d / 8) + 4


def _kivi(bits: int) -> Callable[[int, str], int | float]:
    def per(d: int, role: str) -> int | float:
        if role == "key":
            amortised = 4 * d / KIVI_GROUP
            return math.ceil(d * bits / 8) + (int(amortised) if amortised.is_integer() else amortised)
        if role == "value":
            return math.ceil(d * bits / 8) + 4 * math.ceil(d / KIVI_GROUP)
        raise InvalidInput(f"KIVI role must be 'key' or 'value', got {role!r}")

    return per


def _kivi_stream(bits: int) -> Callable[[int, int, str], int]:
    def stream(d: int, n: int, role: str) -> int:
        codes = math.ceil(d * bits / 8)
        fp = kivi_fp16_tokens(n, role)
        q = n - fp
        if role == "key":  # q is a multiple of R (hence of G): one fp16 scale + zero per channel per group of G tokens
            return q * codes + (q // KIVI_GROUP) * 4 * d + fp * 2 * d
        return q * (codes + 4 * math.ceil(d / KIVI_GROUP)) + fp * 2 * d

    return stream


def _ds(scales: Callable[[int], int]) -> Callable[[int, str], int]:
    def per(d: int, role: str) -> int:
        nope = d - ROPE_DIMS
        if nope <= 0:
            raise InvalidInput(f"this layout needs a dimension above {ROPE_DIMS} (NoPE + 64 RoPE dims), got {d}")
        return nope + scales(nope) + 2 * ROPE_DIMS

    return per


_Q = "kvslim.quant.registry:"
REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the registry (its name must be new); returns it."""
    if fmt.name in REGISTRY:
        raise InvalidInput(f"storage format {fmt.name!r} is registered twice")
    REGISTRY[fmt.name] = fmt
    return fmt


for _f in (
    Format("fp32", "float32", lambda d, r: 4 * d, _Q + "plain", lossless=True),
    Format("fp16", "float16", lambda d, r: 2 * d, _Q + "plain", lossless=True),
    Format("bf16", "bfloat16", lambda d, r: 2 * d, _Q + "plain", lossless=True),
    Format("fp8", "e4m3 codes + one fp32 scale per 128 values", lambda d, r: d + 4 * math.ceil(d / 128), _Q + "fp8"),
    Format("fp4", "e2m1 codes + ue8m0 scale per 32 values", lambda d, r: math.ceil(d / 2) + math.ceil(d / 32),
           _Q + "fp4"),
    Format("tq1", "TurboQuant-MSE 1 bit", _tq(1), _Q + "tq"),
    Format("tq2", "TurboQuant-MSE 2 bits", _tq(2), _Q + "tq"),
    Format("tq2.5", "TurboQuant-MSE 2.5 bits, outlier channels at 3", _split("tq2.5", 3, 2, 4), _Q + "tq_split",
           calibrated=True, chunk_invariant=False),
    Format("tq3", "TurboQuant-MSE 3 bits", _tq(3), _Q + "tq"),
    Format("tq3.5", "TurboQuant-MSE 3.5 bits, outlier channels at 4", _split("tq3.5", 4, 3, 2), _Q + "tq_split",
           calibrated=True, chunk_invariant=False),
    Format("tq4", "TurboQuant-MSE 4 bits", _tq(4), _Q + "tq"),
    Format("tqprod2", "TurboQuant-prod 2 bits: 1-bit MSE + 1-bit QJL residual sketch", _tqprod(2), _Q + "tq_prod"),
    Format("tqprod3", "TurboQuant-prod 3 bits", _tqprod(3), _Q + "tq_prod"),
    Format("tqprod4", "TurboQuant-prod 4 bits", _tqprod(4), _Q + "tq_prod"),
    Format("kivi2", "KIVI 2 bits, keys per channel, values per token", _kivi(2), _Q + "kivi", append_only=True,
           chunk_invariant=False, kinds=("gqa",), per_role=True, stream_nbytes=_kivi_stream(2), store="kvslim.quant.kivi:KiviStore"),
    Format("kivi4", "KIVI 4 bits", _kivi(4), _Q + "kivi", append_only=True, chunk_invariant=False, kinds=("gqa",),
           per_role=True, stream_nbytes=_kivi_stream(4), store="kvslim.quant.kivi:KiviStore"),
    Format("fp8_ds_mla", "FlashMLA V3.2 token: e4m3 NoPE + fp32 scale per 128 + bf16 RoPE",
           _ds(lambda nope: 4 * math.ceil(nope / 128)), kinds=("mla",), index=False),
    Format("fp8_ds_v4", "FlashMLA V4 entry: e4m3 NoPE + ue8m0 scale per 64 (8-B padded) + bf16 RoPE",
           _ds(lambda nope: 8 * math.ceil(math.ceil(nope / 64) / 8)), _Q + "fp8_ds_v4", kinds=("v4",), index=False),
):  # fmt: skip
    register_format(_f)

FORMATS: tuple[str, ...] = tuple(REGISTRY)  # the built-in names, in table order


def get_format(fmt: str) -> Format:
    """The registered format ``fmt``, else ``InvalidInput`` naming the closest known names."""
    found = REGISTRY.get(fmt) if isinstance(fmt, str) else None
    if found is not None:
        return found
    close = difflib.get_close_matches(str(fmt), REGISTRY, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise InvalidInput(f"unknown storage format {fmt!r}: {hint}known formats are {', '.join(REGISTRY)}")


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known format name, else ``InvalidInput`` naming the closest known names."""
    return get_format(fmt).name


def codec_formats(kind: str = "gqa") -> tuple[str, ...]:
    """Names of the formats a codec writes for layers of ``kind`` (``gqa``: the recipe codecs, ``CODEC_NAMES``)."""
    return tuple(n for n, f in REGISTRY.items() if f.codec is not None and kind in f.kinds)


def bytes_per_vector(fmt: str, dim: int, role: str = "key") -> int | float:
    """Bytes one stored vector of dimension ``dim`` takes in format ``fmt`` (see the module table).

    ``role`` ("key" or "value") matters only for KIVI; the KIVI key figure is the amortised one (a float when
    ``dim`` is not a multiple of 8). Raises ``InvalidInput`` for an unknown format or a dim the format cannot take.
    """
    f = get_format(fmt)
    if dim <= 0:
        raise InvalidInput(f"vector dimension must be positive, got {dim}")
    return f.bytes(dim, role)


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
    f = get_format(fmt)
    per = bytes_per_vector(fmt, dim, role)  # validates dim and role
    if f.stream_nbytes is not None:
        return f.stream_nbytes(dim, n, role)
    return int(n * per)


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
