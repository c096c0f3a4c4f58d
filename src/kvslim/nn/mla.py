"""DeepSeek-V3 multi-head latent attention (MLA; DeepSeek-V2 paper §2.1, V3 report §2.1.1).

Per token the cache holds only the RMS-normalised KV latent ``c`` [r] (``kv_lora_rank``) and the shared RoPE key
``k_R`` [r_R] (one for all heads): ``kv_a_proj_with_mqa(x) = [c_raw | k_R_raw]``, ``c = kv_a_layernorm(c_raw)``,
``k_R = RoPE(k_R_raw)``. Two ways to attend over it, each the other's oracle:

- ``naive`` (MHA mode, what transformers does): expand every cached latent with ``kv_b_proj`` into per-head
  keys [nope | rope] and values, then ordinary attention (d_k = nope + rope, d_v = v_head_dim);
- ``absorbed`` (MQA mode, DeepSeek's decode): fold ``W_UK`` (the key rows of ``kv_b_proj``) into the query,
  ``q~_h = W_UK,h^T q_nope,h`` [r], score ``q~_h . c_t + q_R,h . k_R,t``, take ``o_h = sum_t p_t c_t`` [r] and apply
  ``W_UV,h`` afterwards. Nothing per head is materialised per cached token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvslim.errors import InvalidInput
from kvslim.nn._common import GrowBuffer, RMSNorm, Rotary, gather_rows, rope_deinterleave, rope_half

__all__ = ["MLAConfig", "MLA", "MLACache"]


@dataclass
class MLAConfig:
    """Shape of one MLA layer (defaults: DeepSeek-V3). ``q_lora_rank=None`` means a plain ``q_proj``."""

    hidden_size: int = 7168
    num_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    attention_bias: bool = False
    softmax_scale: float | None = None  # default (nope + rope) ** -0.5; transformers adds YaRN's mscale^2
    query_chunk: int = 512

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "query_chunk"):
            if int(getattr(self, name)) <= 0:
                raise InvalidInput(f"MLA config: {name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise InvalidInput(f"MLA config: qk_rope_head_dim must be even and positive, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise InvalidInput(f"MLA config: q_lora_rank must be positive or None, got {self.q_lora_rank}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLACache:
    """Per-layer MLA cache: normalised latents [B, T, r] and RoPE'd shared keys [B, T, r_R] (``nbytes`` = both)."""

    def __init__(self) -> None:
        self.latent = GrowBuffer()
        self.rope_key = GrowBuffer()
        self.seen = 0

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.latent.append(latent)
        self.rope_key.append(rope_key)
        self.seen += latent.shape[1]
        return self.latent.view(), self.rope_key.view()

    def nbytes(self) -> int:
        return self.latent.nbytes() + self.rope_key.nbytes()

    def reserved_nbytes(self) -> int:
        """Bytes allocated (capacity doubles as tokens arrive; at most twice :meth:`nbytes` beyond 64 tokens)."""
        return sum(b.reserved_nbytes() for b in vars(self).values() if isinstance(b, GrowBuffer))


class MLA(nn.Module):
    """One MLA layer. Parameter names follow transformers' ``DeepseekV3Attention``."""

    def __init__(self, config: MLAConfig, rotary: Rotary | None = None):
        super().__init__()
        self.config = c = config
        self.rotary = rotary or Rotary.default(c.qk_rope_head_dim, c.rope_theta)
        self.scaling = c.softmax_scale if c.softmax_scale is not None else c.qk_head_dim**-0.5
        h = c.num_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, h * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def new_state(self) -> MLACache:
        """An empty decode state (the same API as ``V4Attention.new_state``)."""
        return MLACache()

    new_cache = new_state  # earlier name, kept as an alias

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return (rope_deinterleave if self.config.rope_interleave else rope_half)(x, cos, sin)

    def project(self, hidden: torch.Tensor, positions: torch.Tensor):
        """-> q_nope [B,S,H,n], q_rope [B,S,H,r_R], q_residual (None without q LoRA), latent [B,S,r], k_R [B,S,r_R]."""
        c = self.config
        b, s, _ = hidden.shape
        if c.q_lora_rank is None:
            q_res = None
            q = self.q_proj(hidden)
        else:
            q_res = self.q_a_layernorm(self.q_a_proj(hidden))
            q = self.q_b_proj(q_res)
        q = q.view(b, s, c.num_heads, c.qk_head_dim)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split([c.kv_lora_rank, c.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = self.rotary.cos_sin(positions)
        return q_nope, self._rope(q_rope, cos[:, None], sin[:, None]), q_res, latent, self._rope(k_rope, cos, sin)

    def weights_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` [H, n, r] and ``W_UV`` [H, v, r], the per-head blocks of ``kv_b_proj``."""
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, cache: MLACache | None = None, mode: str = "absorbed") -> torch.Tensor:
        """``hidden`` [B, S, D] at positions ``cache.seen ..`` -> [B, S, D]; ``mode`` is ``absorbed`` or ``naive``."""
        if mode not in ("absorbed", "naive"):
            raise InvalidInput(f"MLA mode must be 'absorbed' or 'naive', got {mode!r}")
        cache = cache if cache is not None else MLACache()
        b, s, _ = hidden.shape
        if s == 0:
            return hidden.new_zeros((b, 0, self.config.hidden_size))
        start = cache.seen
        positions = torch.arange(start, start + s)
        q_nope, q_rope, _, latent, k_rope = self.project(hidden, positions)
        lat, kr = cache.append(latent, k_rope)
        out = self._attend(q_nope, q_rope, lat, kr, positions, mode)
        return self.o_proj(out.reshape(b, s, -1))

    def _attend(self, q_nope, q_rope, lat, kr, positions, mode, picks=None):
        """Causal attention of queries at ``positions`` over cached rows 0..T-1 -> [B, S, H, v].

        ``picks`` [B, S, k] (DSA) restricts each query to the given cached rows (-1 or future rows are dropped).
        """
        c = self.config
        out = []
        w_uk, w_uv = self.weights_uk_uv()
        kpos = torch.arange(lat.shape[1])
        for c0 in range(0, q_nope.shape[1], c.query_chunk):
            c1 = min(q_nope.shape[1], c0 + c.query_chunk)
            qn, qr, pos = q_nope[:, c0:c1], q_rope[:, c0:c1], positions[c0:c1]
            if picks is None:
                hi = int(pos[-1]) + 1
                allowed = kpos[None, :hi] <= pos[:, None]  # [C, T']
                bias = torch.zeros(allowed.shape, dtype=qn.dtype).masked_fill(~allowed, float("-inf"))[None, None]
                lt, kt = lat[:, :hi], kr[:, :hi]
                if mode == "naive":
                    out.append(self._naive(qn, qr, lt, kt, bias, w_uk, w_uv))
                else:
                    qa = torch.einsum("bshn,hnr->bhsr", qn, w_uk)
                    scores = (torch.einsum("bhsr,btr->bhst", qa, lt) + torch.einsum("bshe,bte->bhst", qr, kt))
                    p = torch.softmax(scores * self.scaling + bias, dim=-1)
                    o_lat = torch.einsum("bhst,btr->bshr", p, lt)
                    out.append(torch.einsum("bshr,hvr->bshv", o_lat, w_uv))
            else:
                pk = picks[:, c0:c1]
                bad = (pk < 0) | (pk > pos.view(1, -1, 1))
                idx = pk.clamp(min=0)
                ls, ks = gather_rows(lat, idx), gather_rows(kr, idx)  # [B, C, k, r], [B, C, k, r_R]: a real gather
                bias = torch.zeros(pk.shape, dtype=qn.dtype).masked_fill(bad, float("-inf"))[:, None]
                qa = torch.einsum("bshn,hnr->bhsr", qn, w_uk)
                scores = torch.einsum("bhsr,bskr->bhsk", qa, ls) + torch.einsum("bshe,bske->bhsk", qr, ks)
                p = torch.softmax(scores * self.scaling + bias, dim=-1)
                o_lat = torch.einsum("bhsk,bskr->bshr", p, ls)
                out.append(torch.einsum("bshr,hvr->bshv", o_lat, w_uv))
        return torch.cat(out, 1)

    def _naive(self, qn, qr, lt, kt, bias, w_uk, w_uv):
        k_nope = torch.einsum("btr,hnr->bhtn", lt, w_uk)
        v = torch.einsum("btr,hvr->bhtv", lt, w_uv)
        k = torch.cat((k_nope, kt[:, None].expand(-1, k_nope.shape[1], -1, -1)), -1)
        q = torch.cat((qn, qr), -1).transpose(1, 2)  # [B, H, S, n + r_R]
        p = torch.softmax(q @ k.transpose(-1, -2) * self.scaling + bias, dim=-1)
        return (p @ v).transpose(1, 2)
