"""The ``recall`` formats of the vLLM plugin: kvslim's recipe grammar read into what the recall backend needs.

``recall-fp8`` (the plugin's preset: kvslim's own ``recall:k=12,pin=4,span=2+fp8``, exact cold rows; fp8 cold rows,
a quarter of fp32's host bytes at a measured accuracy cost, are ``recall:k=12,pin=4,span=2,cold=fp8+fp8``) or any
``recall:key=value,...[+CODEC]`` of kvslim's grammar (``kvslim recipes``): ``m`` tokens per block
(vLLM's block size is set to it), ``k`` blocks fetched per KV head and decode step (``0``: every block, lossless),
``w`` recent tokens and ``sinks`` first tokens always attended, ``summary`` (``mean`` | ``bbox`` | ``reps`` with
``r``), ``gqa``, ``nbr``, ``pin`` / ``span`` / ``pinw`` (pins, as kvslim's ``recall``: the default ``pin=-1`` is
auto, 4 pins with span 2 where ``k >= 8``; held as stamps in vLLM's pages, :mod:`kvslim.vllm.recall`), ``cold`` (the
codec of the rows in the cold array; ``none``: the model's dtype, exact) and ``+CODEC`` (the codec of the summaries
held in vLLM's pages; none: the model's dtype). Refused with one line: ``rest=mean``, ``prefill=select``,
``store=disk``/``dir``, ``wq=1``, ``hold`` and ``full_first`` (not implemented here). The cold array's size comes from ``cold_bytes``
(``--additional-config '{"kvslim": {"format": "recall-fp8", "cold_bytes": 4294967296}}'`` or
``KVSLIM_VLLM_COLD_BYTES``; default :data:`DEFAULT_COLD_BYTES`).

Imports neither vLLM nor transformers' models (kvslim's recipe parser only).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from kvslim.errors import InvalidInput

__all__ = ["COLD_ENV", "DEFAULT_COLD_BYTES", "PRESETS", "RecallFormat", "cold_bytes_setting", "is_recall",
           "parse_recall"]

COLD_ENV = "KVSLIM_VLLM_COLD_BYTES"
DEFAULT_COLD_BYTES = 4 << 30
#: the plugin's presets: kvslim's own (``recall-fp8`` = ``recall:k=12,pin=4,span=2+fp8``: exact rows in the cold array,
#: the model's dtype), so a preset names the same recipe on both engines (kvslim.cache.recipe.PRESETS)
PRESETS = {"recall-fp8": "recall:k=12,pin=4,span=2+fp8"}
_REFUSED = {"rest": "none", "prefill": "dense", "store": "ram", "dir": "", "wq": 0, "hold": 0}
_TWIN = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def is_recall(fmt: str | None) -> bool:
    return isinstance(fmt, str) and (fmt.strip() in PRESETS or fmt.strip().split(":")[0].split("+")[0] == "recall")


@dataclass(frozen=True)
class RecallFormat:
    """A validated ``recall`` selection: ``text`` as given, ``recipe`` its kvslim recipe string."""

    text: str
    recipe: str
    m: int
    k: int
    w: int
    sinks: int
    summary: str
    r: int
    nbr: int
    gqa: str
    cold: str  # "none": the model's dtype
    codec: str  # of the summaries; "none": the model's dtype
    pin: int = 0  # blocks per KV head pinned by the last query row of a multi-row step
    span: int = 1  # blocks fetched from each pinned block on
    pinw: int = 0  # 1: pins ranked over the whole blocks still in the window too

    @property
    def vectors(self) -> int:
        return {"mean": 1, "bbox": 2, "reps": self.r}[self.summary]

    def cold_format(self, dtype_name: str) -> str:
        """The kvslim format of a cold row (``cold=none``: the lossless twin of the model's dtype)."""
        return self.cold if self.cold != "none" else _twin(dtype_name)

    def summary_format(self, dtype_name: str) -> str:
        return self.codec if self.codec != "none" else _twin(dtype_name)

    @property
    def stamp_bytes(self) -> int:
        """Bytes of one block's pin stamp per KV head (after its summary in the page): ``int32 [1 + pin]``, the
        offset + 1 in the block of the query row that pinned (0: none) and its ``pin`` block indices (-1: none)."""
        return 4 * (1 + self.pin) if self.pin else 0

    def cell_bytes(self, summary_row_bytes: int) -> int:
        """Bytes per (KV head, token) of vLLM's page: one block's summary (``vectors x row``) and pin stamp over its
        ``m`` cells, rounded up to whole bytes per cell."""
        return math.ceil((self.vectors * summary_row_bytes + self.stamp_bytes) / self.m)


def _twin(dtype_name: str) -> str:
    name = str(dtype_name).replace("torch.", "")
    if name not in _TWIN:
        raise InvalidInput(f"kvslim recall: no lossless cold format for model dtype {dtype_name!r}")
    return _TWIN[name]


def parse_recall(fmt: str) -> RecallFormat:
    """``recall-fp8`` or ``recall:...[+CODEC]`` -> :class:`RecallFormat`; ``InvalidInput`` (one line) otherwise."""
    from kvslim.cache.recipe import parse_recipe

    text = fmt.strip()
    body = PRESETS.get(text, text)
    head, plus, codec = body.partition("+")
    recipe = parse_recipe(head + plus + codec)
    if recipe.kind != "recall":
        raise InvalidInput(f"kvslim format {fmt!r} is not a recall recipe")
    p = dict(recipe.params)
    bad = [f"{key}={p[key]}" for key, ok in _REFUSED.items() if p[key] != ok]
    if recipe.full_first:
        bad.append(f"full_first={recipe.full_first}")
    if bad:
        raise InvalidInput(f"kvslim format {fmt!r}: the vLLM plugin's recall does not support {', '.join(bad)} "
                           "(rest, select prefill, the disk store, wq, hold (blocks kept from one decode step to "
                           "the next, per-request state) and full_first are not implemented here)")
    return RecallFormat(text=text, recipe=str(recipe), m=p["m"], k=p["k"], w=p["w"], sinks=p["sinks"],
                        summary=p["summary"], r=p["r"], nbr=p["nbr"], gqa=p["gqa"], cold=p["cold"],
                        codec=recipe.codec, pin=p["pin"], span=p["span"], pinw=p["pinw"])


def cold_bytes_setting(value: object = None) -> int:
    """The cold tier's size in bytes: ``value`` (from ``additional_config``), else ``$KVSLIM_VLLM_COLD_BYTES``,
    else :data:`DEFAULT_COLD_BYTES`."""
    raw = value if value is not None else os.environ.get(COLD_ENV, "").strip() or None
    if raw is None:
        return DEFAULT_COLD_BYTES
    if isinstance(raw, bool):
        raw = "bad"
    try:
        n = int(raw)
    except (TypeError, ValueError):
        raise InvalidInput(f"kvslim cold_bytes must be a whole number of bytes, got {raw!r}") from None
    if n <= 0:
        raise InvalidInput(f"kvslim cold_bytes must be positive, got {n}")
    return n
