"""Codec names -> codecs: ``make_codec(name, dim, seed=0, **options)``, and the shared byte contract.

| name | codec | bytes per vector |
|---|---|---|
| ``fp32`` / ``fp16`` / ``bf16`` | :class:`~kvslim.quant.plain.PlainCodec` | ``4d`` / ``2d`` / ``2d`` |
| ``fp8`` | :class:`~kvslim.quant.fp8.FP8Codec` | ``d + 4*ceil(d/128)`` |
| ``fp4`` | :class:`~kvslim.quant.fp4.FP4Codec` | ``ceil(d/2) + ceil(d/32)`` |
| ``tq1``..``tq4`` | :class:`~kvslim.quant.tq_mse.TurboQuantMSE` | ``ceil(d*b/8) + 2`` |
| ``tq2.5`` / ``tq3.5`` | :class:`~kvslim.quant.tq_split.TurboQuantSplit` | ``ceil(d/4*3/8) + ceil(3d/4*2/8) + 4`` / ``ceil(d/2*4/8) + ceil(d/2*3/8) + 4`` |
| ``tqprod2``..``tqprod4`` | :class:`~kvslim.quant.tq_prod.TurboQuantProd` | ``ceil(d*(b-1)/8) + ceil(d/8) + 4`` |
| ``kivi2`` / ``kivi4`` | :class:`~kvslim.quant.kivi.KiviCodec` | key ``ceil(d*b/8) + 4d/32``; value ``ceil(d*b/8) + 4*ceil(d/32)`` |

Options (keyword): TurboQuant ``rotation`` ("auto" | "hadamard" | "haar") and ``law`` ("beta" | "gaussian");
KIVI ``role`` ("key" | "value", default "key"), ``group`` (32), ``residual`` (128). ``role`` is accepted and
ignored by every other codec, so a cache can pass it uniformly.
"""

from __future__ import annotations

from kvslim.errors import InvalidInput
from kvslim.quant.base import Codec

__all__ = ["CODEC_NAMES", "make_codec", "bytes_per_vector"]

CODEC_NAMES: tuple[str, ...] = (
    "fp32", "fp16", "bf16", "fp8", "fp4",
    "tq1", "tq2", "tq3", "tq4", "tq2.5", "tq3.5",
    "tqprod2", "tqprod3", "tqprod4",
    "kivi2", "kivi4",
)

_SPLITS = {"tq2.5": (3, 2, 4), "tq3.5": (4, 3, 2)}  # hi bits, lo bits, outlier share 1/k of d


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


def make_codec(name: str, dim: int, seed: int = 0, **options) -> Codec:
    """Build the codec ``name`` for vectors of dimension ``dim``; ``seed`` fixes rotations and sketches."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise InvalidInput(f"codec dimension must be a positive integer, got {dim!r}")
    if not isinstance(seed, int):
        raise InvalidInput(f"codec seed must be an integer, got {seed!r}")
    from kvslim.quant import fp4, fp8, kivi, plain, tq_mse, tq_prod, tq_split

    tq_opts = ("rotation", "law")
    if name in plain.PLAIN_DTYPES:
        _options(name, options, ())
        return plain.PlainCodec(dim, name)
    if name == "fp8":
        _options(name, options, ())
        return fp8.FP8Codec(dim)
    if name == "fp4":
        _options(name, options, ())
        return fp4.FP4Codec(dim)
    if name in _SPLITS:
        hi, lo, k = _split_sizes(name, dim)
        return tq_split.TurboQuantSplit(dim, name, hi, lo, k, seed, **_options(name, options, tq_opts))
    if name.startswith("tqprod"):
        bits = _bits(name, "tqprod", range(2, 5))
        return tq_prod.TurboQuantProd(dim, bits, seed, **_options(name, options, tq_opts))
    if name.startswith("tq"):
        bits = _bits(name, "tq", range(1, 5))
        return tq_mse.TurboQuantMSE(dim, bits, seed, **_options(name, options, tq_opts))
    if name.startswith("kivi"):
        bits = _bits(name, "kivi", (2, 4))
        opts = {k: v for k, v in options.items() if k in ("role", "group", "residual")}
        _options(name, options, ("group", "residual"))
        return kivi.KiviCodec(dim, bits, **opts)
    raise InvalidInput(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")


def _bits(name: str, prefix: str, allowed) -> int:
    rest = name[len(prefix):]
    if not rest.isdigit() or int(rest) not in allowed:
        raise InvalidInput(
            f"unsupported codec {name!r}: {prefix} takes bit widths {', '.join(str(b) for b in allowed)}"
            + ("; fractional rates are tq2.5 and tq3.5" if prefix == "tq" else "")
        )
    return int(rest)


def bytes_per_vector(name: str, dim: int, role: str = "key") -> float:
    """Stored bytes per vector from the shared byte contract (independent of the codec classes).

    KIVI keys are amortised over their group of 32 tokens (``4d/32``); everything else is an integer.
    """
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    d = dim
    if name in ("fp32", "fp16", "bf16"):
        return {"fp32": 4, "fp16": 2, "bf16": 2}[name] * d
    if name == "fp8":
        return d + 4 * ceil_div(d, 128)
    if name == "fp4":
        return ceil_div(d, 2) + ceil_div(d, 32)
    if name == "tq2.5":
        _split_sizes(name, d)
        return ceil_div(d // 4 * 3, 8) + ceil_div(3 * d // 4 * 2, 8) + 4
    if name == "tq3.5":
        _split_sizes(name, d)
        return ceil_div(d // 2 * 4, 8) + ceil_div(d // 2 * 3, 8) + 4
    if name.startswith("tqprod"):
        b = _bits(name, "tqprod", range(2, 5))
        return ceil_div(d * (b - 1), 8) + ceil_div(d, 8) + 4
    if name.startswith("tq"):
        b = _bits(name, "tq", range(1, 5))
        return ceil_div(d * b, 8) + 2
    if name.startswith("kivi"):
        b = _bits(name, "kivi", (2, 4))
        if role == "key":
            v = ceil_div(d * b, 8) + 4 * d / 32
            return int(v) if v == int(v) else v
        return ceil_div(d * b, 8) + 4 * ceil_div(d, 32)
    raise InvalidInput(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
