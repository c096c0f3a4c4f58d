"""``latent``: MLA-like low-rank keys and values (DeepSeek-V2 report sec. 2.1.2, fitted training-free as PCA).

Each global layer stores, per token and KV head, ``r`` numbers for the key (projected *pre-RoPE* on a basis ``Uk``)
and ``r`` for the value (on ``Uv``); attention expands them back as ``rope(Uk c, pos)`` and ``Uv c``. The bases are
calibrated on ``pydoc_data.topics`` text (:mod:`kvslim.cache.methods.latent.calibration`); with ``r`` = head dim the layer is
lossless up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...base import BaseLayer, LayerSpec
from ...method import Method, ModelShape, Params, param, register
from ...rope import rotate

__all__ = ["Latent", "LatentLayer", "LatentParams", "LatentSpec"]


@dataclass(frozen=True)
class LatentParams(Params):
    r: int = param(64, "latent rank per KV head (<= head dim)", lo=1)
    calib: int = param(2048, "calibration tokens", lo=1)


@dataclass(frozen=True)
class LatentSpec(LayerSpec):
    """A latent layer of rank ``rank`` (unbounded, no sinks)."""

    rank: int = 64

    def layer_class(self) -> type[BaseLayer]:
        return LatentLayer


@register
class Latent(Method):
    name = "latent"
    family = "latent"
    summary = "MLA-like low-rank keys/values on a basis calibrated on pydoc_data.topics"
    Params = LatentParams
    needs_rope = True
    exactness = "float"
    lossless = ()  # r = the model's head dim (lossless_params)
    examples = ({"r": 6},)

    @classmethod
    def lossless_params(cls, shape: ModelShape) -> list[dict[str, Any]]:
        return [{"r": shape.head_dim}]

    def check(self, shape: ModelShape) -> list[str]:
        reasons = super().check(shape)
        if self.params.r > shape.head_dim:
            reasons.append(f"latent rank r={self.params.r} exceeds the model's head dim {shape.head_dim}; "
                           f"use r <= {shape.head_dim}")  # fmt: skip
        return reasons

    def global_spec(self, index: int) -> LatentSpec:
        return LatentSpec(codec=self.codec, label="latent", rank=self.params.r)

    def prepare(self, model: Any, specs: list[Any], tokenizer: Any = None) -> dict[int, dict[str, Any]]:
        from ....hf_config import read
        from .calibration import latent_bases

        layers = [i for i, s in enumerate(specs) if isinstance(s, LatentSpec)]
        if not layers:
            return {}
        types = list(read(model.config).layer_types)
        bases = latent_bases(model, layers, types, self.params.r, self.params.calib, tokenizer)
        return {i: {"basis": tuple(u.to(model.device) for u in bases[i])} for i in layers}


class LatentLayer(BaseLayer):
    """Exact tail stored as rank-``r`` projections; ``basis = (Uk [h, d, r], Uv [h, d, r])`` float32."""

    needs_positions = True
    codes_tail = False  # the stores hold projections; attention reads the expanded keys and values
    spec: LatentSpec

    def init_state(self) -> None:
        self.basis = self.ctx.extras["basis"]

    def vector_dim(self, head_dim: int) -> int:
        return self.spec.rank

    def encode(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uk, uv = self.basis
        k_pre = rotate(k, -pos, self.inv_freq)
        return torch.einsum("bhnd,hdr->bhnr", k_pre, uk.to(k.dtype)), torch.einsum("bhnd,hdr->bhnr", v, uv.to(v.dtype))

    def decode_tail(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        k, v = self.tail_k.decode(), self.tail_v.decode()
        if k is None:
            return k, v
        uk, uv = self.basis
        k = torch.einsum("bhnr,hdr->bhnd", k, uk.to(k.dtype))
        k = rotate(k, self.tail_pos, self.inv_freq)
        return k, torch.einsum("bhnr,hdr->bhnd", v, uv.to(v.dtype))

    def extra_nbytes(self) -> int:
        return sum(u.numel() * u.element_size() for u in self.basis)

    @classmethod
    def stored_dim(cls, spec: LatentSpec, shape: Any) -> int:
        return spec.rank

    @classmethod
    def predict(cls, spec: LatentSpec, n: int, shape: Any, batch: int = 1) -> dict[str, int]:
        out = super().predict(spec, n, shape, batch)
        h, d, r = shape.kv_heads, shape.head_dim, spec.rank
        expand = 2 * 2 * batch * h * d * r * cls.counts(spec, n)["tail"]  # keys and values back to d dims
        basis = 2 * h * d * r * 4
        return {"stored": out["stored"] + basis, "read": out["read"] + basis, "flops": out["flops"] + expand}
