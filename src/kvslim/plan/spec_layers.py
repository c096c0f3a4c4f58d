"""Per-layer attention specs: GQA/MHA/MQA (full or sliding), MLA / DSA (DeepSeek V3 / V3.2), V4 CSA / HCA / SWA.

Each layer spec answers, for a context of ``n`` tokens (the tokens visible to the current query, itself included):
``streams(n)`` (which vectors it stores), ``state_floats()`` (constant fp32 compressor state), ``attended(n)``
(entries one decode query reads), ``core_flops(n, absorbed)`` (attention-core FLOPs of one query),
``indexer_flops(n)`` (lightning-indexer scoring of one query), ``core_flops_sum(N)`` (the two summed over the
positions 1..N of a prefill, in closed form) and ``proj_params(hidden)`` (weights multiplied once per token).
FLOPs count a multiply-add as 2. See :mod:`kvslim.plan.spec` for the whole-model spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

from ..errors import InvalidInput

__all__ = [
    "GQALayer",
    "IndexerSpec",
    "LayerSpec",
    "MLALayer",
    "Stream",
    "V4Layer",
    "sum_floor",
    "sum_min",
    "sum_min_floor",
    "sum_n",
]


def sum_n(big_n: int) -> int:
    """sum_{n=1}^{N} n."""
    return big_n * (big_n + 1) // 2


def sum_min(big_n: int, w: int) -> int:
    """sum_{n=1}^{N} min(n, w)."""
    if big_n <= w:
        return sum_n(big_n)
    return sum_n(w) + (big_n - w) * w


def sum_floor(big_n: int, m: int) -> int:
    """sum_{n=1}^{N} floor(n / m)."""
    q, r = divmod(big_n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def sum_min_floor(big_n: int, m: int, k: int) -> int:
    """sum_{n=1}^{N} min(floor(n / m), k)."""
    cut = k * m - 1  # floor(n/m) < k exactly for n <= cut
    if big_n <= cut:
        return sum_floor(big_n, m)
    return sum_floor(cut, m) + (big_n - cut) * k


class Stream(NamedTuple):
    """``count`` stored vectors of dimension ``dim`` per KV head, for ``heads`` heads, in the format of component
    ``component`` ("kv" or "index"); ``role`` is "key" or "value" (KIVI stores them differently)."""

    name: str
    component: str
    dim: int
    count: int
    heads: int = 1
    role: str = "key"


@dataclass(frozen=True)
class IndexerSpec:
    """A lightning indexer (DSA, V3.2 paper eq. 1; V4 CSA, section 2.3.1): ``n_heads`` query heads of ``head_dim``
    score ONE cached ``head_dim`` key per token (V3.2) or per compressed entry (V4) and keep the ``topk`` best."""

    n_heads: int
    head_dim: int
    topk: int

    def score_flops(self, n_keys: int) -> int:
        """One query against ``n_keys`` keys: q.k per head (2 d) plus the head-weighted sum of ReLUs (2 per head)."""
        return 2 * self.n_heads * (self.head_dim + 1) * n_keys


@dataclass(frozen=True)
class GQALayer:
    """MHA / GQA / MQA attention; ``window`` = None is full attention, else a sliding window of ``window`` tokens
    (plus the first ``sinks`` tokens). Stores K (``head_dim``) and V (``v_head_dim``) per KV head per token."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int = 0  # 0 = head_dim
    window: int | None = None
    sinks: int = 0

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def kind(self) -> str:
        base = "mha" if self.n_kv_heads == self.n_heads else "mqa" if self.n_kv_heads == 1 else "gqa"
        return base if self.window is None else f"sliding({self.window})"

    def stored_tokens(self, n: int) -> int:
        return n if self.window is None else min(n, self.window + self.sinks)

    def streams(self, n: int) -> list[Stream]:
        t = self.stored_tokens(n)
        return [
            Stream("k", "kv", self.head_dim, t, self.n_kv_heads, "key"),
            Stream("v", "kv", self.dv, t, self.n_kv_heads, "value"),
        ]

    def state_floats(self) -> int:
        return 0

    def attended(self, n: int) -> dict[str, int]:
        return {"kv": self.stored_tokens(n)}

    def core_flops(self, n: int, absorbed: bool = True) -> int:
        return 2 * self.n_heads * self.stored_tokens(n) * (self.head_dim + self.dv)

    def indexer_flops(self, n: int) -> int:
        return 0

    def core_flops_sum(self, big_n: int) -> int:
        seen = sum_n(big_n) if self.window is None else sum_min(big_n, self.window + self.sinks)
        return 2 * self.n_heads * (self.head_dim + self.dv) * seen

    def proj_params(self, hidden: int) -> int:
        qkv = hidden * (self.n_heads * self.head_dim + self.n_kv_heads * (self.head_dim + self.dv))
        return qkv + self.n_heads * self.dv * hidden


@dataclass(frozen=True)
class MLALayer:
    """DeepSeek V3 MLA (latent ``kv_lora_rank`` + decoupled RoPE key ``qk_rope_head_dim`` cached per token); with
    ``indexer`` it is V3.2's DSA: the indexer key (``indexer.head_dim``) is cached too and the core attends to the
    indexer's top-k tokens only. Decode runs in absorbed "MQA mode" (d_k = 576, d_v = 512, V3.2 paper appendix A);
    prefill in "MHA mode" (d_k = 192, d_v = 128)."""

    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0  # 0 = no query compression
    indexer: IndexerSpec | None = None

    @property
    def kind(self) -> str:
        return "mla" if self.indexer is None else "dsa"

    def streams(self, n: int) -> list[Stream]:
        out = [Stream("latent", "kv", self.kv_lora_rank + self.qk_rope_head_dim, n)]
        if self.indexer is not None:
            out.append(Stream("index", "index", self.indexer.head_dim, n))
        return out

    def state_floats(self) -> int:
        return 0

    def attended(self, n: int) -> dict[str, int]:
        if self.indexer is None:
            return {"kv": n}
        return {"kv": min(n, self.indexer.topk), "index": n}

    def core_flops(self, n: int, absorbed: bool = True) -> int:
        att = self.attended(n)["kv"]
        if absorbed:
            per_key = (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        else:
            per_key = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
        return 2 * self.n_heads * att * per_key

    def indexer_flops(self, n: int) -> int:
        return 0 if self.indexer is None else self.indexer.score_flops(n)

    def core_flops_sum(self, big_n: int) -> int:
        """Prefill runs in MHA mode (d_k = nope + rope, d_v = v_head_dim); DSA selects top-k per query."""
        per_key = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
        if self.indexer is None:
            return 2 * self.n_heads * per_key * sum_n(big_n)
        core = 2 * self.n_heads * per_key * sum_min(big_n, self.indexer.topk)
        return core + self.indexer.score_flops(1) * sum_n(big_n)

    def proj_params(self, hidden: int) -> int:
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = hidden * self.q_lora_rank + self.q_lora_rank * self.n_heads * qk
        else:
            q = hidden * self.n_heads * qk
        kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = self.n_heads * self.v_head_dim * hidden
        total = q + kv_a + kv_b + o
        if self.indexer is not None:
            ix = self.indexer
            q_in = self.q_lora_rank or hidden
            total += q_in * ix.n_heads * ix.head_dim + hidden * ix.head_dim + hidden * ix.n_heads
        return total


@dataclass(frozen=True)
class V4Layer:
    """DeepSeek V4 attention layer (HF blog / V4 paper section 2.3; transformers ``DeepseekV4Attention``).

    ``kind``: "swa" (window only), "csa" (window + top-k of n // m overlapping compressed entries, ``indexer``
    required) or "hca" (window + all n // m' compressed entries). One shared K=V ``head_dim`` entry per token in
    the ``window``; compressed entries have the same shape. Queries: ``q_lora_rank`` low-rank; output: grouped
    projection (``o_groups`` groups to ``o_lora_rank`` each, then to hidden)."""

    kind: str
    n_heads: int
    head_dim: int = 512
    rope_dim: int = 64
    window: int = 128
    compress_rate: int = 0
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    indexer: IndexerSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("swa", "csa", "hca"):
            raise InvalidInput(f"V4 layer kind must be swa, csa or hca, got {self.kind!r}")
        if (self.kind == "swa") != (self.compress_rate == 0) or (self.kind == "csa") != (self.indexer is not None):
            raise InvalidInput("V4 layer: swa has compress_rate 0; csa (only) has an indexer")

    def entries(self, n: int) -> int:
        """Compressed entries whose window has closed at context n (entry j covers tokens up to (j+1)m - 1)."""
        return n // self.compress_rate if self.compress_rate else 0

    def streams(self, n: int) -> list[Stream]:
        out = [Stream("window", "kv", self.head_dim, min(n, self.window))]
        if self.compress_rate:
            out.append(Stream("compressed", "kv", self.head_dim, self.entries(n)))
        if self.indexer is not None:
            out.append(Stream("index", "index", self.indexer.head_dim, self.entries(n)))
        return out

    def state_floats(self) -> int:
        """Upper bound of the fp32 compressor buffers (transformers' DeepseekV4{CSA,HCA}Cache layout): HCA keeps up
        to m' pending tokens of kv + gate (d wide); CSA keeps m pending tokens of kv + gate (2d wide, two series)
        plus the previous window's overlap slice (m x d, kv + gate), and the same again for its indexer at d^I."""
        m, d = self.compress_rate, self.head_dim
        if self.kind == "hca":
            return 2 * m * d
        if self.kind == "csa":
            assert self.indexer is not None
            return 6 * m * d + 6 * m * self.indexer.head_dim
        return 0

    def attended(self, n: int) -> dict[str, int]:
        window = min(n, self.window)
        if self.kind == "swa":
            return {"kv": window}
        if self.kind == "hca":
            return {"kv": window + self.entries(n)}
        assert self.indexer is not None
        return {"kv": window + min(self.entries(n), self.indexer.topk), "index": self.entries(n)}

    def core_flops(self, n: int, absorbed: bool = True) -> int:
        return 2 * self.n_heads * self.attended(n)["kv"] * 2 * self.head_dim  # scores + values, K = V

    def indexer_flops(self, n: int) -> int:
        return 0 if self.indexer is None else self.indexer.score_flops(self.entries(n))

    def core_flops_sum(self, big_n: int) -> int:
        seen = sum_min(big_n, self.window)
        if self.kind == "hca":
            seen += sum_floor(big_n, self.compress_rate)
        if self.indexer is not None:
            seen += sum_min_floor(big_n, self.compress_rate, self.indexer.topk)
        core = 2 * self.n_heads * 2 * self.head_dim * seen
        if self.indexer is None:
            return core
        return core + self.indexer.score_flops(1) * sum_floor(big_n, self.compress_rate)

    def proj_params(self, hidden: int) -> int:
        hd = self.n_heads * self.head_dim
        total = hidden * self.q_lora_rank + self.q_lora_rank * hd + hidden * self.head_dim
        total += hd * self.o_lora_rank + self.o_groups * self.o_lora_rank * hidden
        if self.kind == "hca":
            total += 2 * hidden * self.head_dim  # compressor kv + gate
        if self.kind == "csa":
            assert self.indexer is not None
            ix = self.indexer
            total += 2 * hidden * 2 * self.head_dim  # compressor kv + gate, two overlapping series
            total += 2 * hidden * 2 * ix.head_dim  # indexer's own compressor
            total += self.q_lora_rank * ix.n_heads * ix.head_dim + hidden * ix.n_heads  # indexer q_b + weights_proj
        return total


LayerSpec = Union[GQALayer, MLALayer, V4Layer]
