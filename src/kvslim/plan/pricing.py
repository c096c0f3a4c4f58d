"""The planner's price of a recipe on a stock model: bytes stored, bytes read per decode step and decode FLOPs.

The figures come from the same method objects a cache uses: ``Recipe.layer_specs`` gives each layer's spec, and the
layer class's ``predict`` gives its bytes (what ``nbytes()`` measures, codec constants aside; a test checks the two
are equal for every registered method) and the attention-core FLOPs of one decode step. Decode FLOPs add the
projections (2 x active parameters) of the model's :class:`~kvslim.plan.spec.ArchSpec`, as :func:`kvslim.plan.decode_flops`.
``dtype`` is the model's own storage (what codec ``none`` keeps). Batch 1; codec constants (rotations, codebooks:
a few KiB per layer) are not counted, as everywhere in the planner.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInput
from .accounting import kv_bytes
from .spec import ArchSpec

__all__ = ["price_recipe"]


def price_recipe(arch: ArchSpec, recipe: str, n: int, dtype: str = "bf16") -> dict[str, Any]:
    """``{"recipe", "kv_bytes", "read_bytes", "decode_flops", "attention_flops", "layers", "kv_ratio"}`` at context
    ``n`` for ``recipe`` applied to ``arch`` (GQA layers only); ``kv_ratio`` is against the full cache in ``dtype``."""
    from ..cache.method import ModelShape
    from ..cache.recipe import canonical, parse_recipe

    if dtype not in ("fp32", "fp16", "bf16"):
        raise InvalidInput(f"with --recipe, --kv-format names the model's dtype (bf16, fp16 or fp32), got {dtype!r}; "
                           "the recipe's +CODEC sets the storage")  # fmt: skip
    shape = ModelShape.from_arch(arch, dtype)
    r = parse_recipe(recipe)
    if r.full_first > len(shape.layer_types):
        raise InvalidInput(f"full_first={r.full_first} exceeds {arch.name}'s {len(shape.layer_types)} layers")
    reasons = r.method.check(shape)
    if reasons:
        raise InvalidInput(f"recipe {r}: {reasons[0]}")
    specs = r.layer_specs(list(shape.layer_types), shape.sliding_window)
    layers = [s.layer_class().predict(s, n, shape) for s in specs]
    stored = sum(p["stored"] for p in layers)
    attention = sum(p["flops"] for p in layers)
    return {
        "recipe": canonical(r),
        "kv_bytes": stored,
        "read_bytes": sum(p["read"] for p in layers),
        "attention_flops": attention,
        "decode_flops": 2 * arch.active_params() + attention,
        "layers": [{"label": s.label, **p} for s, p in zip(specs, layers, strict=True)],
        "kv_ratio": stored / kv_bytes(arch, n, dtype, include_state=False),
    }
