"""The planner's price of a recipe on a stock model: bytes stored, bytes read per decode step and decode FLOPs.

The figures come from the same method objects a cache uses: :func:`kvslim.cache.recipe.resolve` (what
``make_cache`` builds from) gives each layer's spec and the reasons a recipe cannot run on the model, and the
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
from .spec_layers import GQALayer

__all__ = ["model_shape", "price_recipe"]


def model_shape(arch: ArchSpec, dtype: str = "bf16") -> Any:
    """The :class:`~kvslim.cache.method.ModelShape` of a planner ``ArchSpec`` made of GQA layers (stock models:
    full and sliding layers)."""
    from ..cache.method import ModelShape

    if not arch.layers or not all(isinstance(layer, GQALayer) for layer in arch.layers):
        raise InvalidInput(f"recipes apply to stock models with GQA/MHA/MQA layers; {arch.name} has "
                           f"{arch.kinds_summary()} (plan it with --kv-format instead)")  # fmt: skip
    first = arch.layers[0]
    windows = {layer.window for layer in arch.layers if layer.window is not None}
    types = tuple("full_attention" if layer.window is None else "sliding_attention" for layer in arch.layers)
    return ModelShape(types, first.n_heads, first.n_kv_heads, first.head_dim, min(windows) if windows else None,
                      dtype, True, arch.name)  # fmt: skip


def price_recipe(arch: ArchSpec, recipe: Any, n: int, dtype: str = "bf16") -> dict[str, Any]:
    """``{"recipe", "kv_bytes", "read_bytes", "decode_flops", "attention_flops", "layers", "kv_ratio"}`` at context
    ``n`` for ``recipe`` (a string or a parsed :class:`~kvslim.cache.recipe.Recipe`) applied to ``arch`` (GQA
    layers only); ``kv_ratio`` is against the full cache in ``dtype``."""
    from ..cache.recipe import resolve

    if dtype not in ("fp32", "fp16", "bf16"):
        raise InvalidInput(f"with --recipe, --kv-format names the model's dtype (bf16, fp16 or fp32), got {dtype!r}; "
                           "the recipe's +CODEC sets the storage")  # fmt: skip
    shape = model_shape(arch, dtype)
    res = resolve(recipe, shape, arch.name)
    specs = res.require()
    layers = [s.layer_class().predict(s, n, shape) for s in specs]
    stored = sum(p["stored"] for p in layers)
    attention = sum(p["flops"] for p in layers)
    return {
        "recipe": str(res.recipe),
        "kv_bytes": stored,
        "read_bytes": sum(p["read"] for p in layers),
        "attention_flops": attention,
        "decode_flops": 2 * arch.active_params() + attention,
        "layers": [{"label": s.label, **p} for s, p in zip(specs, layers, strict=True)],
        "kv_ratio": stored / kv_bytes(arch, n, dtype, include_state=False),
    }
