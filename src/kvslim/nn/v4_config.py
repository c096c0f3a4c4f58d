"""Shape and schedule of one DeepSeek-V4 attention layer, checked at construction.

Kinds (V4 paper §2.3; transformers ``layer_types``): ``"swa"`` = sliding window only (``sliding_attention``),
``"csa"`` = window + compressed sparse attention (``compressed_sparse_attention``: overlapping m=4 compressor,
lightning indexer, top-k), ``"hca"`` = window + heavily compressed attention (``heavily_compressed_attention``:
non-overlapping m'=128 compressor, dense over its entries).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvslim.errors import InvalidInput

__all__ = ["V4Config", "KINDS", "HF_LAYER_TYPES"]

KINDS = ("swa", "csa", "hca")
HF_LAYER_TYPES = {
    "sliding_attention": "swa",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}


@dataclass
class V4Config:
    """One V4 attention layer. Defaults are V4-Flash's except the kind (V4-Flash: 64 heads, hidden 4096).

    ``rope_dim`` trailing dims of each 512-d head carry RoPE; ``o_groups`` x ``o_lora_rank`` is the grouped output
    projection; ``compress_rate`` is m (CSA) or m' (HCA) and ignored for SWA; the ``index_*`` fields are CSA-only.
    ``query_chunk`` bounds prefill memory (queries processed per block; results do not depend on it);
    ``prefill_chunk``: a call with more tokens runs as consecutive calls of at most this many (a chunked prefill,
    equal to a one-shot one to float tolerance), so a long prefill never holds queries for all its tokens at once
    (at V4-Flash width those are 128 KiB per token).
    """

    hidden_size: int = 4096
    num_heads: int = 64
    head_dim: int = 512
    rope_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    kind: str = "csa"
    window: int = 128
    compress_rate: int = 4
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    query_chunk: int = 256
    prefill_chunk: int = 2048

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidInput(f"V4 attention config: {msg}")

        if self.kind not in KINDS:
            bad(f"kind {self.kind!r} is not one of {KINDS}")
        for name in ("hidden_size", "num_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "window",
                     "query_chunk", "prefill_chunk"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_dim <= 0 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            bad(f"rope_dim {self.rope_dim} must be even, positive and at most head_dim {self.head_dim}")
        if (self.num_heads * self.head_dim) % self.o_groups:
            bad(f"num_heads*head_dim = {self.num_heads * self.head_dim} is not divisible by o_groups {self.o_groups}")
        if self.kind == "swa":
            return
        if self.compress_rate <= 0:
            bad(f"compress_rate must be positive for kind {self.kind!r}, got {self.compress_rate}")
        if self.window < self.compress_rate:
            bad(f"window {self.window} is smaller than the compression rate m = {self.compress_rate}: the tokens "
                "waiting in the compressor buffer would be invisible; use window >= m")
        if self.kind == "csa":
            if self.index_topk <= 0:
                bad(f"index_topk must be positive for CSA, got {self.index_topk}")
            if self.index_n_heads <= 0 or self.index_head_dim <= 0:
                bad("CSA needs index_n_heads > 0 and index_head_dim > 0")
            if self.index_head_dim < self.rope_dim:
                bad(f"index_head_dim {self.index_head_dim} is smaller than rope_dim {self.rope_dim}: the indexer "
                    "rotates its trailing rope_dim dims")

    @classmethod
    def from_hf(cls, config: object, layer_idx: int, **overrides: object) -> V4Config:
        """The config of layer ``layer_idx`` of a transformers ``DeepseekV4Config``."""
        kind = HF_LAYER_TYPES[config.layer_types[layer_idx]]
        rate = {"csa": config.compress_rates["compressed_sparse_attention"],
                "hca": config.compress_rates["heavily_compressed_attention"]}.get(kind, 0)
        kw = dict(
            hidden_size=config.hidden_size, num_heads=config.num_attention_heads, head_dim=config.head_dim,
            rope_dim=int(config.qk_rope_head_dim), q_lora_rank=config.q_lora_rank, o_groups=config.o_groups,
            o_lora_rank=config.o_lora_rank, kind=kind, window=config.sliding_window, compress_rate=rate,
            index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim, index_topk=config.index_topk,
            eps=config.rms_norm_eps, rope_theta=config.rope_parameters["main"]["rope_theta"],
            compress_rope_theta=config.rope_parameters["compress"]["rope_theta"],
        )
        kw.update(overrides)
        return cls(**kw)
