"""Codec names -> codecs: ``make_codec(name, dim, seed=0, **options)``, reading the format registry.

Which names exist, their byte formulas and flags are declared once, in :mod:`kvslim.formats`; each format names one
of the factories below. ``CODEC_NAMES`` are the formats a codec writes for per-head keys and values (the recipe
codecs); ``make_codec`` also builds ``fp8_ds_v4`` (DeepSeek V4's entry layout, for :mod:`kvslim.nn`).

| name | codec |
|---|---|
| ``fp32`` / ``fp16`` / ``bf16`` | :class:`~kvslim.quant.plain.PlainCodec` |
| ``fp8`` | :class:`~kvslim.quant.fp8.FP8Codec` |
| ``fp4`` | :class:`~kvslim.quant.fp4.FP4Codec` |
| ``tq1``..``tq4`` | :class:`~kvslim.quant.tq_mse.TurboQuantMSE` |
| ``tq2.5`` / ``tq3.5`` | :class:`~kvslim.quant.tq_split.TurboQuantSplit` |
| ``tqprod2``..``tqprod4`` | :class:`~kvslim.quant.tq_prod.TurboQuantProd` |
| ``kivi2`` / ``kivi4`` | :class:`~kvslim.quant.kivi.KiviCodec` |
| ``fp8_ds_v4`` | :class:`~kvslim.quant.fp8_ds.FP8DsV4Codec` |

Options (keyword): TurboQuant ``rotation`` ("auto" | "hadamard" | "haar") and ``law`` ("beta" | "gaussian");
KIVI ``role`` ("key" | "value", default "key"), ``group`` (32), ``residual`` (128); ``fp8_ds_v4`` ``rope_dim``
(64). ``role`` is accepted and ignored by every other codec, so a cache can pass it uniformly.
"""

from __future__ import annotations

from kvslim import formats
from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec

__all__ = ["CODEC_NAMES", "make_codec", "bytes_per_vector"]

CODEC_NAMES: tuple[str, ...] = formats.codec_formats("gqa")

_SPLITS = {"tq2.5": (3, 2, 4), "tq3.5": (4, 3, 2)}  # hi bits, lo bits, outlier share 1/k of d
_TQ_OPTS = ("rotation", "law")


def _options(name: str, options: dict, allowed: tuple[str, ...]) -> dict:
    unknown = sorted(set(options) - set(allowed) - {"role"})
    if unknown:
        raise InvalidInput(f"codec {name!r} takes no option(s) {unknown}; it accepts {sorted(allowed) or 'none'}")
    return {k: v for k, v in options.items() if k in allowed}


def _split_sizes(name: str, dim: int) -> tuple[int, int, int]:
    hi, lo, k = _SPLITS[name]
    if dim % k:
        raise InvalidInput(f"{name} puts d/{k} channels at {hi} bits; d={dim} is not divisible by {k}")
    return hi, lo, dim // k


def _bits(name: str, prefix: str, allowed) -> int:
    rest = name[len(prefix):]
    if not rest.isdigit() or int(rest) not in allowed:
        raise InvalidInput(
            f"unsupported codec {name!r}: {prefix} takes bit widths {', '.join(str(b) for b in allowed)}"
            + ("; fractional rates are tq2.5 and tq3.5" if prefix == "tq" else "")
        )
    return int(rest)


# ---- factories named by kvslim.formats: function(name, dim, seed, **options) -> Codec -------------------------
def plain(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.plain import PlainCodec

    _options(name, options, ())
    return PlainCodec(dim, name)


def fp8(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.fp8 import FP8Codec

    _options(name, options, ())
    return FP8Codec(dim)


def fp4(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.fp4 import FP4Codec

    _options(name, options, ())
    return FP4Codec(dim)


def tq(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.tq_mse import TurboQuantMSE

    return TurboQuantMSE(dim, _bits(name, "tq", range(1, 5)), seed, **_options(name, options, _TQ_OPTS))


def tq_split(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.tq_split import TurboQuantSplit

    hi, lo, k = _split_sizes(name, dim)
    return TurboQuantSplit(dim, name, hi, lo, k, seed, **_options(name, options, _TQ_OPTS))


def tq_prod(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.tq_prod import TurboQuantProd

    return TurboQuantProd(dim, _bits(name, "tqprod", range(2, 5)), seed, **_options(name, options, _TQ_OPTS))


def kivi(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.kivi import KiviCodec

    bits = _bits(name, "kivi", (2, 4))
    opts = {k: v for k, v in options.items() if k in ("role", "group", "residual")}
    _options(name, options, ("group", "residual"))
    return KiviCodec(dim, bits, **opts)


def fp8_ds_v4(name: str, dim: int, seed: int, **options) -> Codec:
    from kvslim.quant.fp8_ds import FP8DsV4Codec

    return FP8DsV4Codec(dim, **_options(name, options, ("rope_dim",)))


def make_codec(name: str, dim: int, seed: int = 0, **options) -> Codec:
    """Build the codec ``name`` for vectors of dimension ``dim``; ``seed`` fixes rotations and sketches."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise InvalidInput(f"codec dimension must be a positive integer, got {dim!r}")
    if not isinstance(seed, int):
        raise InvalidInput(f"codec seed must be an integer, got {seed!r}")
    fmt = formats.REGISTRY.get(name) if isinstance(name, str) else None
    if fmt is None or fmt.codec is None:
        for prefix, allowed in (("tqprod", range(2, 5)), ("tq", range(1, 5)), ("kivi", (2, 4))):
            if isinstance(name, str) and name.startswith(prefix):
                _bits(name, prefix, allowed)  # names the bit widths the family takes
        known = ", ".join(n for n, f in formats.REGISTRY.items() if f.codec is not None)
        raise InvalidInput(f"unknown codec {name!r}; choose one of {known}")
    return fmt.make_codec(dim, seed, **options)


def bytes_per_vector(name: str, dim: int, role: str = "key") -> float:
    """Stored bytes per vector from the shared byte contract (``kvslim.formats``, the planner's arithmetic).

    KIVI keys are amortised over their group of 32 tokens (``4d/32``); everything else is an integer.
    """
    if name not in CODEC_NAMES:
        raise InvalidInput(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    return formats.bytes_per_vector(name, dim, role=role)
