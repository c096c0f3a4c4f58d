"""Architecture specs: what each layer's attention keeps per token and what each token costs to compute.

An :class:`ArchSpec` is a tuple of per-layer attention specs plus per-layer MLP specs. Three attention families cover
every model kvslim plans for:

* :class:`GQALayer` - multi-head (``n_kv_heads == n_heads``), grouped-query and multi-query (``n_kv_heads == 1``)
  attention, full or sliding-window (``window``, optionally with ``sinks`` kept first tokens); Llama, Qwen 2, Gemma 3's
  local/global hybrid.
* :class:`MLALayer` - DeepSeek V3 multi-head latent attention (caches the 512-d latent + the 64-d decoupled RoPE key),
  and with an :class:`IndexerSpec` DeepSeek V3.2's DSA (lightning-indexer keys, top-k selection).
* :class:`V4Layer` - DeepSeek V4 attention: a shared K=V 512-d entry per token in a 128-token window in every layer,
  plus compressed entries (CSA: one per m = 4 tokens, overlapping, selected top-k by an indexer; HCA: one per
  m' = 128 tokens, all attended; SWA: none).

The layer specs live in :mod:`kvslim.plan.spec_layers`; each answers, for a context of ``n`` tokens (the tokens
visible to the current query, itself included), what it stores, what one decode query reads, and what it costs.
FLOPs count a multiply-add as 2 (PaLM, Chinchilla). Biases, norms, RoPE, softmax and top-k selection are not counted.
Presets live in :mod:`kvslim.plan.presets` (``preset(name)``); specs from transformers configs in :mod:`kvslim.plan.spec_hf`
(``from_config(config)``); both import this module, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput
from .spec_layers import (
    GQALayer,
    IndexerSpec,
    LayerSpec,
    MLALayer,
    Stream,
    V4Layer,
    sum_floor,
    sum_min,
    sum_min_floor,
    sum_n,
)

__all__ = [
    "ArchSpec",
    "GQALayer",
    "IndexerSpec",
    "LayerSpec",
    "MLALayer",
    "MLPSpec",
    "Stream",
    "V4Layer",
    "sum_floor",
    "sum_min",
    "sum_min_floor",
    "sum_n",
]

@dataclass(frozen=True)
class MLPSpec:
    """A SwiGLU MLP: dense (``intermediate``) or MoE (``n_routed`` experts of ``intermediate``, ``top_k`` active,
    plus ``n_shared`` always-active experts of the same width and a linear router)."""

    intermediate: int
    n_routed: int = 0
    top_k: int = 0
    n_shared: int = 0

    def total_params(self, hidden: int) -> int:
        per = 3 * hidden * self.intermediate
        if not self.n_routed:
            return per
        return (self.n_routed + self.n_shared) * per + hidden * self.n_routed

    def active_params(self, hidden: int) -> int:
        per = 3 * hidden * self.intermediate
        if not self.n_routed:
            return per
        return (self.top_k + self.n_shared) * per + hidden * self.n_routed


@dataclass(frozen=True)
class ArchSpec:
    """A model: per-layer attention specs, per-layer MLP specs and the embedding shape.

    ``max_context`` is the longest context the model supports; ``tie_embeddings`` says whether the output head
    shares the embedding matrix (its matmul is still counted per token). MTP/draft layers are not included."""

    name: str
    hidden_size: int
    vocab_size: int
    layers: tuple[Any, ...]
    mlps: tuple[MLPSpec, ...]
    max_context: int
    tie_embeddings: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.mlps):
            raise InvalidInput(f"{len(self.layers)} attention specs but {len(self.mlps)} MLP specs")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def kinds_summary(self) -> str:
        """E.g. ``30 gqa`` or ``15 sliding(512) + 3 mqa`` (counts in first-seen order)."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.kind] = counts.get(layer.kind, 0) + 1
        return " + ".join(f"{n} {k}" for k, n in counts.items())

    def total_params(self) -> int:
        """Weight-matrix parameters (embedding, output head unless tied, attention, MLPs); norms and biases omitted."""
        h = self.hidden_size
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        attn = sum(layer.proj_params(h) for layer in self.layers)
        return emb + attn + sum(m.total_params(h) for m in self.mlps)

    def active_params(self) -> int:
        """Parameters multiplied once per token: attention, active experts + router, output head (not the lookup)."""
        h = self.hidden_size
        attn = sum(layer.proj_params(h) for layer in self.layers)
        return self.vocab_size * h + attn + sum(m.active_params(h) for m in self.mlps)
