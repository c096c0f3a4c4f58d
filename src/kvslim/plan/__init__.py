"""The planner: architecture specs and what a KV cache costs on them, as pure arithmetic.

* :mod:`~kvslim.plan.spec_layers`, :mod:`~kvslim.plan.spec`: per-layer attention specs and :class:`ArchSpec`;
  :mod:`~kvslim.plan.presets` (``preset(name)``) and :mod:`~kvslim.plan.spec_hf` (specs from transformers configs)
  build them, importing ``spec``, never the reverse.
* :mod:`~kvslim.plan.accounting`: bytes stored and read, FLOPs, what fits (re-exported here: ``kvslim.plan.kv_bytes``).
* :mod:`~kvslim.plan.pricing`: the price of a cache recipe on a stock model, from the methods' ``predict``;
  :mod:`~kvslim.plan.tiers`: hot / cold tiers of a recipe against a memory budget.

The planner sits above :mod:`kvslim.cache` (it prices recipes with the methods' own ``predict``) and below the
CLI; nothing in ``cache`` imports it. Names are imported on first use.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "GiB": "kvslim.plan.accounting",
    "bytes_per_token": "kvslim.plan.accounting",
    "check_cache": "kvslim.plan.accounting",
    "check_context": "kvslim.plan.accounting",
    "decode_flops": "kvslim.plan.accounting",
    "decode_read_bytes": "kvslim.plan.accounting",
    "expected_cache_bytes": "kvslim.plan.accounting",
    "expected_layer_bytes": "kvslim.plan.accounting",
    "fit": "kvslim.plan.accounting",
    "kv_breakdown": "kvslim.plan.accounting",
    "kv_bytes": "kvslim.plan.accounting",
    "layer_format": "kvslim.plan.accounting",
    "parse_bytes": "kvslim.plan.accounting",
    "parse_contexts": "kvslim.plan.accounting",
    "prefill_flops": "kvslim.plan.accounting",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("kvslim.plan", _EXPORTS, globals())
