"""Exact parsing of the numbers users type: token counts with ``k`` / ``M`` suffixes, byte sizes, integer ranges.

One meaning everywhere (``kvslim plan --context``, ``kvslim niah --lengths``): ``k`` = 2^10 = 1,024 tokens and
``M`` = 2^20 = 1,048,576 tokens (DeepSeek's "1M context"), case-insensitive. Arithmetic is exact (``Fraction``):
``0.5k`` is 512, ``0.8005k`` (819.712) is refused rather than rounded, and a 30-digit count is refused as beyond
int64 rather than rounded through a float. Every integer kvslim accepts fits in a signed 64-bit integer.
"""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import InvalidInput

__all__ = ["INT64_MAX", "TOKEN_UNITS", "check_int", "parse_count", "parse_counts", "parse_exact"]

INT64_MAX = (1 << 63) - 1
TOKEN_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}
_NUMBER = re.compile(r"^\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_exact(text: str, units: dict[str, int], what: str, example: str, noun: str = "a whole number") -> int:
    """``"<number><unit>"`` -> an exact int (``units`` maps lower-case suffixes to factors); refuses fractions."""
    m = _NUMBER.match(text)
    unit = m.group(3).lower() if m else ""
    if not m or unit not in units:
        raise InvalidInput(f"{what}: {text.strip()!r} is not {noun} like {example}")
    value = Fraction(m.group(2)) * units[unit]
    if m.group(1) == "-":
        value = -value
    if value.denominator != 1:
        raise InvalidInput(f"{what}: {text.strip()!r} is {float(value):g}, not a whole number")
    return int(value)


def check_int(value: int, what: str, minimum: int = 1, maximum: int = INT64_MAX) -> int:
    """``value`` if ``minimum <= value <= maximum`` (default: 1 .. int64 max), else ``InvalidInput`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be a whole number, got {value!r}")
    if value < minimum:
        need = "positive" if minimum == 1 else f"at least {minimum}"
        raise InvalidInput(f"{what} must be {need}, got {value}")
    if value > maximum:
        limit = "2^63 - 1 (int64)" if maximum == INT64_MAX else str(maximum)
        raise InvalidInput(f"{what} must be at most {limit}, got {value}")
    return value


def parse_count(text: str, what: str = "count", minimum: int = 1) -> int:
    """A token count: ``"8192"``, ``"128k"`` (131,072), ``"1M"`` (1,048,576), ``"0.5k"`` (512); exact, within int64."""
    n = parse_exact(text, TOKEN_UNITS, what, "8192, 128k or 1M (k = 1024, M = 2^20)")
    return check_int(n, what, minimum)


def parse_counts(text: str, what: str = "count", minimum: int = 1) -> list[int]:
    """Comma-separated :func:`parse_count` values; empty items and an empty list are refused."""
    parts = text.split(",")
    if not text.strip() or any(not p.strip() for p in parts):
        raise InvalidInput(f"{what}: {text!r} has an empty item: separate values with single commas")
    return [parse_count(p, what, minimum) for p in parts]
