"""The vLLM plugin's tiered ``recall`` backend without an engine: page sizing (summaries only), the cold array
addressed by vLLM's slots, decode selection against a reference written here (per-block min/max bound, top-k per KV
head, sinks + window), exact prefill chunks, and the counts."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM is not installed here: `make vllm` builds .venv-vllm")

from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

import kvslim.vllm as plugin  # noqa: E402
from kvslim.errors import InvalidInput  # noqa: E402
from kvslim.vllm import recall as rb  # noqa: E402
from kvslim.vllm.backend import KvslimMetadata  # noqa: E402
from kvslim.vllm.recall_spec import parse_recall  # noqa: E402

pytestmark = pytest.mark.vllm
D, HQ, HKV = 64, 9, 3


@pytest.fixture
def select(monkeypatch):
    def pick(fmt: str) -> None:
        monkeypatch.setitem(plugin._state, "format", fmt)
        rb.reset_stats()

    return pick


def test_pages_hold_only_block_summaries(select):
    select("recall-fp8")  # m=32, bbox (2 vectors) through fp8 (68 B at d=64): 136 B per block and KV head
    spec = rb.KvslimRecallBackend.customize_spec(
        FullAttentionSpec(block_size=32, num_kv_heads=HKV, head_size=D, dtype=torch.float32))
    assert spec.dtype == torch.uint8 and spec.state_content_size_bytes == 5  # ceil(136 / 32)
    assert spec.page_size_bytes == 32 * HKV * 5  # against 32 * 3 * 2 * 64 * 2 B of a bf16 page: 1/51
    with pytest.raises(InvalidInput, match="block size is 16"):
        rb.KvslimRecallBackend.customize_spec(
            FullAttentionSpec(block_size=16, num_kv_heads=HKV, head_size=D, dtype=torch.float32))


@pytest.mark.parametrize("text, words", [("recall:k=8,pin=2", ["pin=2"]), ("recall:store=disk", ["store=disk"]),
                                         ("recall:zz=1", ["unknown key 'zz'"]), ("recall-fp9", ["unknown"])])
def test_unsupported_recall_recipes_are_refused_in_one_line(text, words):
    with pytest.raises(InvalidInput) as e:
        parse_recall(text)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def _setup(fmt: str, lengths: list[int], seed: int = 0):
    """An impl, a page pool and its cold array holding ``lengths[i]`` tokens of request i (blocks shuffled)."""
    torch.manual_seed(seed)
    rf = parse_recall(fmt)
    impl = rb.KvslimRecallImpl(num_heads=HQ, head_size=D, scale=D ** -0.5, num_kv_heads=HKV)
    spec = rb.KvslimRecallBackend.customize_spec(
        FullAttentionSpec(block_size=rf.m, num_kv_heads=HKV, head_size=D, dtype=torch.float32))
    nblk = [-(-n // rf.m) for n in lengths]
    perm = (torch.randperm(sum(nblk) + 3) + 1)[: sum(nblk)]  # block 0 is vLLM's null block
    table = torch.zeros(len(lengths), max(nblk), dtype=torch.int32)
    at = 0
    for i, nb in enumerate(nblk):
        table[i, :nb] = perm[at:at + nb].to(torch.int32)
        at += nb
    cache = torch.zeros(sum(nblk) + 4, HKV, rf.m, spec.state_content_size_bytes, dtype=torch.uint8)
    keys = [torch.randn(n, HKV, D) for n in lengths]
    vals = [torch.randn(n, HKV, D) for n in lengths]
    # a few "needle" keys far from the mean, so the bound ranks their blocks high for queries like them
    for k in keys:
        k[len(k) // 3] *= 4.0

    def slots(i, a, b):
        pos = torch.arange(a, b)
        return table[i, pos // rf.m].long() * rf.m + pos % rf.m

    for i, n in enumerate(lengths):  # in uneven chunks, as chunked prefill writes them
        for a in range(0, n, 37):
            b = min(n, a + 37)
            impl.do_kv_cache_update(None, keys[i][a:b], vals[i][a:b], cache, slots(i, a, b))
    return rf, impl, cache, table, keys, vals


def _reference_decode(rf, q, k, v):
    """One decode query ``q [HQ, d]`` over ``k/v [L, HKV, d]`` (float32, exact rows) under the recall rule, written
    out: blocks wholly before the window scored by their min/max bound, the group's heads by max; top k per KV head;
    sinks + chosen blocks + window attended exactly. Returns ``(out [HQ, d], fetched rows)``."""
    n, m, g = k.shape[0], rf.m, HQ // HKV
    nt = max(0, (n - rf.w) // m)
    qg = q.view(HKV, g, D)
    out, fetched = torch.empty(HQ, D), 0
    for h in range(HKV):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[: rf.sinks] = True
        keep[nt * m:] = True
        base = keep.clone()
        if nt and rf.k and rf.k < nt:
            blocks = k[: nt * m, h].view(nt, m, D)
            lo, hi = blocks.amin(1), blocks.amax(1)  # [nt, d]
            bound = torch.maximum(qg[h][:, None, :] * lo[None], qg[h][:, None, :] * hi[None]).sum(-1)  # [g, nt]
            ranked = bound.amax(0).sort(descending=True).values
            assert ranked[rf.k - 1] - ranked[rf.k] > 1e-3, "a near tie at the k-th block: pick another seed"
            top = bound.amax(0).topk(rf.k).indices
            for j in top.tolist():
                keep[j * m:(j + 1) * m] = True
        else:
            keep[:] = True
        fetched += int((keep & ~base).sum())
        s = (qg[h] @ k[keep, h].T) * D ** -0.5
        out[h * g:(h + 1) * g] = torch.softmax(s, -1) @ v[keep, h]
    return out, fetched


@pytest.mark.parametrize("fmt", ["recall:m=16,k=2,w=32,sinks=4", "recall:m=16,k=3,w=48,sinks=0,gqa=max",
                                 "recall:m=16,k=0,w=32", "recall:m=16,k=50,w=32", "recall:m=16,k=2,w=32,cold=fp8",
                                 "recall:m=16,k=2,w=32,sinks=20"])
def test_decode_selects_like_the_reference_and_counts_what_it_fetched(select, fmt):
    """Three decodes in one step (lengths 300, 130 and 20: the last has no block out of its window)."""
    select(fmt)
    lengths = [300, 130, 20]
    rf, impl, cache, table, keys, vals = _setup(fmt, lengths)
    q = torch.randn(3, HQ * D)
    for i, k in enumerate(keys):  # make each query look for its request's needle
        q[i].view(HQ, D)[:] += 0.5 * k[len(k) // 3].repeat_interleave(HQ // HKV, 0)
    output = torch.full((4, HQ * D), float("nan"))
    meta = KvslimMetadata(num_actual_tokens=3, query_start_loc=torch.tensor([0, 1, 2, 3]),
                          seq_lens=torch.tensor(lengths), block_table=table, slot_mapping=torch.empty(0))
    impl.forward(None, torch.cat([q, torch.zeros(1, HQ * D)]), None, None, cache, meta, output)
    fetched = 0
    codec = impl.clay.codec  # the cold rows' codec (fp8: the reference reads what the cold tier holds)
    for i in range(3):
        k, v = (x if rf.cold == "none" else codec.decode(codec.encode(x.transpose(0, 1))).transpose(0, 1)
                for x in (keys[i], vals[i]))
        ref, f = _reference_decode(rf, q[i].view(HQ, D), k, v)
        fetched += f
        torch.testing.assert_close(output[i].view(HQ, D), ref, rtol=1e-4, atol=1e-4)
    assert torch.isnan(output[3]).all()
    s = rb.stats()
    assert s["layers"] == 1 and s["decode_tokens"] == 3
    cell = 2 * codec.bytes_per_vector()  # [key | value]: fp32 512 B, fp8 136 B per token and KV head
    assert s["fetched_bytes"] == fetched * cell
    assert s["cold_bytes"] == cache.shape[0] * HKV * rf.m * cell
    assert s["pool_bytes"] == cache.numel()
    if rf.k == 2:  # a real selection: a small share of the 300-token context read for its blocks
        assert 0 < s["fetched_share"] < 1


def test_prefill_chunks_attend_exactly_over_every_row(select):
    """A chunk of 5 queries after 200 cached tokens and a one-shot 40-token prefill: exact causal attention."""
    fmt = "recall:m=16,k=1,w=16"
    select(fmt)
    rf, impl, cache, table, keys, vals = _setup(fmt, [205, 40], seed=3)
    q = torch.randn(45, HQ * D)
    output = torch.empty(45, HQ * D)
    meta = KvslimMetadata(num_actual_tokens=45, query_start_loc=torch.tensor([0, 5, 45]),
                          seq_lens=torch.tensor([205, 40]), block_table=table, slot_mapping=torch.empty(0))
    impl.forward(None, q, None, None, cache, meta, output)
    for i, (a, b, n) in enumerate([(0, 5, 205), (5, 45, 40)]):
        kk = keys[i].repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
        vv = vals[i].repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
        qq = q[a:b].view(b - a, HQ, D).transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(n - (b - a), n)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=D ** -0.5)
        torch.testing.assert_close(output[a:b].view(b - a, HQ, D), ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_summaries_are_written_when_a_block_completes_and_rewritten_when_it_is_reused(select):
    fmt = "recall:m=16,k=1,w=16"
    select(fmt)
    rf, impl, cache, table, keys, vals = _setup(fmt, [40])
    b0, b2 = int(table[0, 0]), int(table[0, 2])
    assert cache[b0].any() and not cache[b2].any()  # block 2 holds 8 of 16 tokens: no summary yet
    lo = keys[0][:16].amin(0)  # [HKV, d]: the bbox's first vector (fp32 summaries: exact)
    got = cache[b0].reshape(HKV, -1)[:, : 4 * D].contiguous().view(torch.float32)
    torch.testing.assert_close(got, lo)
    new = torch.randn(16, HKV, D)  # vLLM hands block b0 to another request: its next writes replace rows + summary
    impl.do_kv_cache_update(None, new, new, cache, b0 * 16 + torch.arange(16))
    got = cache[b0].reshape(HKV, -1)[:, : 4 * D].contiguous().view(torch.float32)
    torch.testing.assert_close(got, new.amin(0))


def _config(block_size=128, user_block=False, kv_bytes=256 << 20, max_len=8192, override=None):
    from types import SimpleNamespace

    mc = SimpleNamespace(get_head_size=lambda: D, dtype=torch.float32, get_num_layers=lambda pc: 30,
                         get_num_kv_heads=lambda pc: HKV, max_model_len=max_len)
    cc = SimpleNamespace(block_size=block_size, user_specified_block_size=user_block, kv_cache_memory_bytes=kv_bytes,
                         num_gpu_blocks_override=override)
    return SimpleNamespace(model_config=mc, cache_config=cc, parallel_config=None)


def test_pool_is_capped_by_the_cold_tier_and_the_block_size_is_m(monkeypatch):
    monkeypatch.setenv("KVSLIM_VLLM_COLD_BYTES", "1")  # restored after the test (the hook sets it)
    cfg = _config()
    plugin._size_recall("recall-fp8", cfg, 1 << 30)  # fp8 rows: 30 x 3 x 32 x 136 B = 391,680 B per block
    assert cfg.cache_config.block_size == 32 and cfg.cache_config.user_specified_block_size
    assert cfg.cache_config.num_gpu_blocks_override == (1 << 30) // 391_680  # the cold tier is the limit
    assert os.environ["KVSLIM_VLLM_COLD_BYTES"] == str(1 << 30)  # spawned engine processes size the same way
    cfg = _config(kv_bytes=8 << 20)  # hot: 30 x 3 x 32 x 5 B = 14,400 B per block -> 582 blocks
    plugin._size_recall("recall-fp8", cfg, 1 << 30)
    assert cfg.cache_config.num_gpu_blocks_override == (8 << 20) // 14_400
    with pytest.raises(InvalidInput, match=r"cold_bytes=10000000 holds 25 blocks .* fewer than one 8192-token"):
        plugin._size_recall("recall-fp8", _config(), 10_000_000)
    with pytest.raises(InvalidInput, match="--block-size 16 differs from the recipe's block m=32"):
        plugin._size_recall("recall-fp8", _config(block_size=16, user_block=True), 1 << 30)


@pytest.mark.parametrize("sel, words", [
    ({"format": "recall-fp8", "cold_bytes": "lots"}, "cold_bytes must be a whole number of bytes"),
    ({"format": "recall-fp8", "cold_bytes": -5}, "cold_bytes must be positive"),
    ({"format": "recall-fp8", "cold_bytes": True}, "cold_bytes must be a whole number"),
    ({"format": "tq4", "cold_bytes": 1 << 30}, "format 'tq4' has none"),
    ({"format": "recall-fp8", "cold": 1}, "takes only"),
])
def test_bad_cold_bytes_are_refused_in_one_line(sel, words):
    with pytest.raises(InvalidInput, match=words):
        plugin.selection_from_config({"kvslim": sel})
    assert plugin.selection_from_config({"kvslim": {"format": "recall-fp8", "cold_bytes": 123}}) == "recall-fp8"
    assert plugin.cold_bytes_from_config({"kvslim": {"format": "recall-fp8", "cold_bytes": 123}}) == 123
