"""DeepSeek-V3.2 sparse attention (DSA; V3.2 paper §2.1): a lightning indexer picks k cached tokens per query and
MLA attends to just those (a gather of k latents, MQA mode), O(T) cheap indexer work + O(k) attention per token.

Indexer (transformers ``DeepseekV32Indexer``): keys ``k_s = RoPE(LayerNorm(wk(x_s)))`` [d_I], ONE per token shared
by all indexer heads (half-split RoPE on the *leading* rope dims), cached for every token; queries
``q_{t,h} = RoPE(wq_b(q_residual_t))`` [H_I, d_I]; score
``I(t, s) = sum_h w_{t,h} * ReLU(q_{t,h} . k_s / sqrt(d_I))`` with ``w = weights_proj(x_t) / sqrt(H_I)``; future
tokens score -inf; keep the top ``min(k, T)``. The FP8 / Hadamard path of the reference kernel is not simulated
(transformers does not either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvslim.errors import InvalidInput
from kvslim.nn._common import GrowBuffer, Rotary, lightning_scores, rope_half, topk_first
from kvslim.nn.mla import MLA, MLACache, MLAConfig

__all__ = ["DSAConfig", "DSA", "DSACache", "DSAIndexer"]


@dataclass
class DSAConfig(MLAConfig):
    """MLA shape plus the indexer (defaults: DeepSeek-V3.2-Exp, 64 heads of 128, top-k 2048)."""

    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.q_lora_rank is None:
            raise InvalidInput("DSA config: the indexer reads the query LoRA latent; q_lora_rank must be set")
        if self.index_topk <= 0:
            raise InvalidInput(f"DSA config: index_topk must be positive, got {self.index_topk}")
        if self.index_n_heads <= 0 or self.index_head_dim <= 0:
            raise InvalidInput("DSA config: index_n_heads and index_head_dim must be positive")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise InvalidInput(f"DSA config: index_head_dim {self.index_head_dim} is smaller than qk_rope_head_dim "
                               f"{self.qk_rope_head_dim}; the indexer rotates that many of its dims")


class DSACache(MLACache):
    """MLA cache plus the indexer keys [B, T, d_I] (counted in ``nbytes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.index_keys = GrowBuffer()

    def nbytes(self) -> int:
        return super().nbytes() + self.index_keys.nbytes()


class DSAIndexer(nn.Module):
    """The lightning indexer; parameter names follow transformers (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``)."""

    def __init__(self, config: DSAConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.rope_dim, self.topk = (c.index_n_heads, c.index_head_dim,
                                                                 c.qk_rope_head_dim, c.index_topk)
        self.wq_b = nn.Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)
        self.softmax_scale = c.index_head_dim**-0.5

    def _rope_lead(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rope_dim
        return torch.cat((rope_half(x[..., :r], cos, sin), x[..., r:]), -1)

    def keys(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._rope_lead(self.k_norm(self.wk(hidden)), cos, sin)  # [B, S, d_I]

    def select(self, hidden, q_res, cos, sin, positions, keys, chunk: int = 512) -> torch.Tensor:
        """Top-k cached rows per query [B, S, min(k, T)] (rows past the query are returned but must be dropped)."""
        b, s, _ = hidden.shape
        q = self.wq_b(q_res).view(b, s, self.n_heads, self.head_dim)
        q = self._rope_lead(q, cos[:, None], sin[:, None]).float()
        w = self.weights_proj(hidden).float() * self.n_heads**-0.5  # [B, S, H]
        k = min(self.topk, keys.shape[1])
        kt = keys.float().transpose(-1, -2)  # [B, d, T]
        out = []
        for c0 in range(0, s, chunk):
            c1 = min(s, c0 + chunk)
            scores = lightning_scores(q[:, c0:c1], w[:, c0:c1], kt, self.softmax_scale)  # [B, C, T]
            future = torch.arange(keys.shape[1])[None] > positions[c0:c1, None]
            out.append(topk_first(scores.masked_fill(future, float("-inf")), k))
        return torch.cat(out, 1)


class DSA(MLA):
    """MLA + lightning indexer + top-k sparse attention over the gathered latents (parameter names as transformers'
    ``DeepseekV32Attention``). ``mode="absorbed"`` gathers; ``mode="naive"`` expands the picked latents per head
    (the oracle)."""

    def __init__(self, config: DSAConfig, rotary: Rotary | None = None):
        super().__init__(config, rotary)
        self.indexer = DSAIndexer(config)

    def new_state(self) -> DSACache:
        """An empty decode state (the same API as ``V4Attention.new_state``)."""
        return DSACache()

    new_cache = new_state  # earlier name, kept as an alias

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, cache: DSACache | None = None, mode: str = "absorbed") -> torch.Tensor:
        if mode not in ("absorbed", "naive"):
            raise InvalidInput(f"DSA mode must be 'absorbed' or 'naive', got {mode!r}")
        cache = cache if cache is not None else DSACache()
        b, s, _ = hidden.shape
        if s == 0:
            return hidden.new_zeros((b, 0, self.config.hidden_size))
        positions = torch.arange(cache.seen, cache.seen + s)
        q_nope, q_rope, q_res, latent, k_rope = self.project(hidden, positions)
        cos, sin = self.rotary.cos_sin(positions)
        cache.index_keys.append(self.indexer.keys(hidden, cos, sin))
        lat, kr = cache.append(latent, k_rope)
        picks = self.indexer.select(hidden, q_res, cos, sin, positions, cache.index_keys.view(), self.config.query_chunk)
        if mode == "naive":
            out = self._naive_sparse(q_nope, q_rope, lat, kr, positions, picks)
        else:
            out = self._attend(q_nope, q_rope, lat, kr, positions, mode, picks=picks)
        return self.o_proj(out.reshape(b, s, -1))

    def _naive_sparse(self, q_nope, q_rope, lat, kr, positions, picks):
        """Dense per-head attention with a mask that keeps only the picked, causal rows (the oracle)."""
        t = lat.shape[1]
        keep = torch.zeros((picks.shape[0], picks.shape[1], t), dtype=torch.bool).scatter(-1, picks, True)
        keep &= torch.arange(t)[None, None] <= positions[None, :, None]
        bias = torch.zeros(keep.shape, dtype=q_nope.dtype).masked_fill(~keep, float("-inf"))[:, None]
        w_uk, w_uv = self.weights_uk_uv()
        return self._naive(q_nope, q_rope, lat, kr, bias, w_uk, w_uv)
