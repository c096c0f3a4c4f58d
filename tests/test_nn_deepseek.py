"""Native DeepSeek attention (kvslim.nn) against transformers 5.24's own modules, and against itself.

Prefill equals transformers to <= 1e-5 relative error (fp32, batch 2, random weights); token-by-token and chunked
decode equal our own prefill across several compressed windows, window wrap-around and top-k < entries.
"""

from __future__ import annotations

import pytest
import torch

from kvslim.errors import InvalidInput
from kvslim.nn import DSA, MLA, V4Attention, V4Config, from_transformers
from kvslim.nn.hf_reference import (
    hf_attention,
    hf_prefill,
    hf_v4_cache,
    hf_v4_step,
    tiny_v3_config,
    tiny_v4_config,
    tiny_v32_config,
)

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def hidden(b: int, s: int, d: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, s, d, generator=torch.Generator().manual_seed(seed))


V3_CONFIGS = {
    "v3-interleave": dict(),
    "v3-halfsplit-noqlora": dict(rope_interleave=False, q_lora_rank=None, num_attention_heads=2, num_key_value_heads=2),
    "v3-yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "rope_theta": 10000.0, "mscale_all_dim": 1.0, "mscale": 1.0}),
}
V32_CONFIGS = {"v32-topk8": dict(), "v32-topk3-8heads": dict(index_topk=3, num_attention_heads=8, num_key_value_heads=8)}
V4_CONFIGS = {
    # kind, overrides; sequences of 40 tokens: window 8 wraps 5 times, CSA m=4 -> 10 entries > top-k 4,
    # HCA m'=8 -> 5 entries
    "swa-w8": ("sliding_attention", dict()),
    "swa-w5-2groups": ("sliding_attention", dict(sliding_window=5, num_attention_heads=2, o_groups=1)),
    "csa-m4-k4": ("compressed_sparse_attention", dict()),
    "csa-m4-k3-w6": ("compressed_sparse_attention", dict(index_topk=3, sliding_window=6, index_n_heads=12)),
    "csa-m2-k5-yarn": ("compressed_sparse_attention", dict(
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8}, index_topk=5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "hca-m8-w8": ("heavily_compressed_attention", dict()),
    "hca-m6-w7": ("heavily_compressed_attention", dict(
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 6}, sliding_window=7)),
}


@pytest.mark.parametrize("name", sorted(V3_CONFIGS))
def test_mla_equals_transformers_and_itself(name: str) -> None:
    hf = hf_attention(tiny_v3_config(**V3_CONFIGS[name]), seed=3)
    ours = from_transformers(hf)
    assert isinstance(ours, MLA)
    x = hidden(2, 24)
    ref = hf_prefill(hf, x)
    absorbed, naive = ours(x, mode="absorbed"), ours(x, mode="naive")
    assert rel(naive, ref) <= TOL
    assert rel(absorbed, ref) <= TOL
    assert rel(absorbed, naive) <= TOL
    cache = ours.new_state()
    steps = torch.cat([ours(x[:, t : t + 1], cache, mode="absorbed") for t in range(24)], 1)
    assert rel(steps, absorbed) <= TOL
    # the cache holds exactly the normalised latent + the shared RoPE key per token
    c = ours.config
    assert cache.nbytes() == 2 * 24 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


@pytest.mark.parametrize("name", sorted(V32_CONFIGS))
def test_dsa_equals_transformers_and_itself(name: str) -> None:
    hf = hf_attention(tiny_v32_config(**V32_CONFIGS[name]), seed=4)
    ours = from_transformers(hf)
    assert isinstance(ours, DSA)
    x = hidden(2, 30, seed=2)
    ref = hf_prefill(hf, x)
    absorbed, naive = ours(x, mode="absorbed"), ours(x, mode="naive")
    assert rel(absorbed, ref) <= TOL
    assert rel(naive, ref) <= TOL
    cache = ours.new_state()
    steps = torch.cat([ours(x[:, t : t + 1], cache) for t in range(30)], 1)
    assert rel(steps, absorbed) <= TOL
    c = ours.config
    assert cache.nbytes() == 2 * 30 * (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 4


def test_dsa_top_k_changes_the_output() -> None:
    """The sparse path really is sparse: with top-k below the context the output differs from dense MLA."""
    hf = hf_attention(tiny_v32_config(index_topk=3), seed=4)
    ours = from_transformers(hf)
    x = hidden(2, 30, seed=2)
    sparse = ours(x)
    ours.indexer.topk = 1000
    assert rel(sparse, ours(x)) > 1e-3


@pytest.mark.parametrize("name", sorted(V4_CONFIGS))
def test_v4_equals_transformers_and_itself(name: str) -> None:
    kind, overrides = V4_CONFIGS[name]
    hf = hf_attention(tiny_v4_config(kind, **overrides), seed=5)
    ours = from_transformers(hf)
    assert isinstance(ours, V4Attention)
    x = hidden(2, 40, seed=6)
    ref = hf_prefill(hf, x)
    full = ours(x)
    assert rel(full, ref) <= TOL
    state = ours.new_state()
    steps = torch.cat([ours(x[:, t : t + 1], state) for t in range(40)], 1)
    assert rel(steps, full) <= TOL
    state = ours.new_state()
    chunks = torch.cat([ours(x[:, a:b], state) for a, b in ((0, 7), (7, 8), (8, 21), (21, 40))], 1)
    assert rel(chunks, full) <= TOL
    c = ours.config
    if c.kind != "swa":
        assert state.compressor.count == 40 // c.compress_rate >= 3
    if c.kind == "csa":
        assert c.index_topk < state.compressor.count
    c.prefill_chunk = 9  # a longer call runs as calls of <= 9 tokens (bounded prefill memory), same results
    assert rel(ours(x), full) <= TOL


def test_v4_decode_equals_transformers_decode() -> None:
    """A 3-layer stack (SWA, CSA, HCA) decoded after a prefill matches transformers' cached decode."""
    cfg = tiny_v4_config(num_layers=3, layer_types=["sliding_attention", "compressed_sparse_attention",
                                                    "heavily_compressed_attention"])
    hf = [hf_attention(cfg, i, seed=10 + i) for i in range(3)]
    ours = [from_transformers(m) for m in hf]
    states = [m.new_state() for m in ours]
    cache = hf_v4_cache(cfg)
    x = hidden(2, 30, seed=7)

    def run(chunk: torch.Tensor) -> torch.Tensor:
        for m, st in zip(ours, states, strict=True):
            chunk = chunk + m(chunk, st)
        return chunk

    assert rel(run(x[:, :17]), hf_v4_step(hf, x[:, :17], cache, 0)) <= TOL
    for t in range(17, 30):
        assert rel(run(x[:, t : t + 1]), hf_v4_step(hf, x[:, t : t + 1], cache, t)) <= TOL


def test_v4_state_bytes() -> None:
    hf = hf_attention(tiny_v4_config("compressed_sparse_attention"), seed=5)
    ours = from_transformers(hf)
    state = ours.new_state()
    ours(hidden(2, 41), state)
    c = ours.config
    window = 2 * c.window * c.head_dim * 4
    entries = 2 * 10 * c.head_dim * 4
    keys = 2 * 10 * c.index_head_dim * 4
    buffers = 2 * 2 * c.compress_rate * (2 * c.head_dim + 2 * c.index_head_dim) * 4  # open-window kv + gate
    carry = 2 * 2 * c.compress_rate * (c.head_dim + c.index_head_dim) * 4
    assert state.nbytes() == window + entries + keys + buffers + carry


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(kind="csa", window=2, compress_rate=4), "window 2 is smaller"),
        (dict(kind="hca", window=64, compress_rate=128), "window 64 is smaller"),
        (dict(kind="csa", index_topk=0), "index_topk must be positive"),
        (dict(kind="csa", index_topk=-3), "index_topk must be positive"),
        (dict(rope_dim=96, head_dim=64), "rope_dim 96"),
        (dict(kind="csa", index_head_dim=32, rope_dim=64), "index_head_dim 32"),
        (dict(num_heads=3, head_dim=65, o_groups=2), "not divisible by o_groups"),
        (dict(kind="mla"), "kind 'mla'"),
        (dict(prefill_chunk=0), "prefill_chunk must be positive"),
    ],
)
def test_v4_refuses_impossible_configs(overrides: dict, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        V4Config(**overrides)


def test_mla_dsa_refuse_bad_configs() -> None:
    from kvslim.nn import DSAConfig, MLAConfig

    with pytest.raises(InvalidInput, match="index_topk"):
        DSAConfig(index_topk=0)
    with pytest.raises(InvalidInput, match="qk_rope_head_dim"):
        MLAConfig(qk_rope_head_dim=7)
    with pytest.raises(InvalidInput, match="index_head_dim"):
        DSAConfig(index_head_dim=32, qk_rope_head_dim=64)


def test_from_transformers_refuses_other_modules() -> None:
    with pytest.raises(InvalidInput, match="not a DeepSeek"):
        from_transformers(torch.nn.Linear(2, 2))


def test_transplanted_transformers_cache_decodes_like_transformers() -> None:
    """bench/native_v4.py times transformers' decode on a cache copied from kvslim's state; that cache must decode
    exactly as transformers' own prefill-then-decode does."""
    from kvslim.nn.hf_reference import hf_v4_cache_from_states

    cfg = tiny_v4_config(num_layers=3, layer_types=["sliding_attention", "compressed_sparse_attention",
                                                    "heavily_compressed_attention"])
    hf = [hf_attention(cfg, i, seed=20 + i) for i in range(3)]
    ours = [from_transformers(m) for m in hf]
    x = hidden(2, 27, seed=8)
    own = hf_v4_cache(cfg)
    hf_v4_step(hf, x[:, :23], own, 0)
    states = [m.new_state() for m in ours]
    h = x[:, :23]
    for m, st in zip(ours, states, strict=True):
        h = h + m(h, st)
    moved = hf_v4_cache_from_states(cfg, states)
    for t in range(23, 27):
        a = hf_v4_step(hf, x[:, t : t + 1], own, t)
        b = hf_v4_step(hf, x[:, t : t + 1], moved, t)
        assert rel(b, a) <= TOL


def test_indexer_ties_break_alike_in_decode_and_prefill() -> None:
    """With 4 indexer heads exact score ties (all ReLUs zero -> score 0) reach the top-k boundary. transformers'
    torch.topk then picks width-dependent entries, so its own prefill and decode disagree; kvslim's picks the
    earliest tied entries, so its decode, chunked prefill and prefill agree."""
    cfg = tiny_v4_config("compressed_sparse_attention", index_n_heads=4, index_topk=4)
    hf = hf_attention(cfg, seed=5)
    ours = from_transformers(hf)
    x = hidden(2, 120, seed=0)
    ref = hf_prefill(hf, x)
    cache = hf_v4_cache(cfg)
    hf_steps = torch.cat([hf_v4_step([hf], x[:, t : t + 1], cache, t) - x[:, t : t + 1] for t in range(120)], 1)
    assert rel(hf_steps, ref) > 1e-2  # ties are present and transformers breaks them inconsistently
    full = ours(x)
    state = ours.new_state()
    assert rel(torch.cat([ours(x[:, t : t + 1], state) for t in range(120)], 1), full) <= TOL
    ours.config.query_chunk = 7
    assert rel(ours(x), full) <= TOL


def test_empty_call_is_a_no_op() -> None:
    ours = from_transformers(hf_attention(tiny_v4_config("heavily_compressed_attention"), seed=1))
    state = ours.new_state()
    assert ours(hidden(2, 0), state).shape == (2, 0, 64) and state.seen == 0
    for m in (from_transformers(hf_attention(tiny_v3_config())), from_transformers(hf_attention(tiny_v32_config()))):
        cache = m.new_state()
        assert m(hidden(2, 0), cache).shape == (2, 0, 64) and cache.seen == 0


def test_from_transformers_keeps_each_parameter_dtype() -> None:
    hf = hf_attention(tiny_v4_config("compressed_sparse_attention"), seed=1).to(torch.bfloat16)
    with torch.no_grad():
        hf.sinks.data = hf.sinks.data.float()
    ours = from_transformers(hf)
    assert ours.q_a_proj.weight.dtype == torch.bfloat16 and ours.sinks.dtype == torch.float32
    assert ours.rotary.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("kind", ["v3", "v32"])
def test_mla_dsa_chunked_prefill_equals_prefill(kind: str) -> None:
    cfg = tiny_v3_config() if kind == "v3" else tiny_v32_config(index_topk=5)
    ours = from_transformers(hf_attention(cfg, seed=9))
    x = hidden(2, 33, seed=4)
    full = ours(x)
    cache = ours.new_state()
    chunks = torch.cat([ours(x[:, a:b], cache) for a, b in ((0, 9), (9, 10), (10, 33))], 1)
    assert rel(chunks, full) <= TOL
    ours.config.query_chunk = 4
    assert rel(ours(x), full) <= TOL
