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


@pytest.mark.parametrize("text, words", [("recall:prefill=select", ["prefill=select"]),
                                         ("recall:k=8,pin=3,span=3", ["pin=3"]), ("recall:store=disk", ["store=disk"]),
                                         ("recall:zz=1", ["unknown key 'zz'"]), ("recall-fp9", ["unknown"]),
                                         ("recall:k=12,hold=2", ["hold=2"])])
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


def _reference_decode(rf, q, k, v, pins=None):
    """One decode query ``q [HQ, d]`` over ``k/v [L, HKV, d]`` (float32, exact rows) under the recall rule, written
    out: blocks wholly before the window scored by their min/max bound, the group's heads by max; top k per KV head
    (``pins [HKV][...]``: those blocks, each with the ``span - 1`` after it, first); sinks + chosen blocks + window
    attended exactly. Returns ``(out [HQ, d], fetched rows)``."""
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
            marked = sorted({j + o for j in (pins[h] if pins else []) for o in range(rf.span) if j + o < nt})
            rest = bound.amax(0).clone()
            rest[marked] = float("-inf")
            free = rf.k - len(marked)
            ranked = rest.sort(descending=True).values
            assert free == 0 or ranked[free - 1] - ranked[free] > 1e-3, "a near tie at the k-th block: another seed"
            top = rest.topk(free).indices.tolist() + marked
            for j in top:
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


FP8_COLD = "recall:k=12,pin=4,span=2,cold=fp8+fp8"  # the preset with fp8 rows in the cold tier


def test_the_plugin_preset_is_kvslims_own_recipe():
    from kvslim.cache.recipe import PRESETS as KVSLIM_PRESETS
    from kvslim.vllm.recall_spec import PRESETS, parse_recall

    assert PRESETS["recall-fp8"] == KVSLIM_PRESETS["recall-fp8"][0]
    assert parse_recall("recall-fp8").cold == "none" and parse_recall(FP8_COLD).cold == "fp8"


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
    plugin._size_recall(FP8_COLD, cfg, 1 << 30)  # fp8 rows: 30 x 3 x 32 x 136 B = 391,680 B per block
    assert cfg.cache_config.block_size == 32 and cfg.cache_config.user_specified_block_size
    assert cfg.cache_config.num_gpu_blocks_override == (1 << 30) // 391_680  # the cold tier is the limit
    assert os.environ["KVSLIM_VLLM_COLD_BYTES"] == str(1 << 30)  # spawned engine processes size the same way
    cfg = _config(kv_bytes=8 << 20)  # hot: 30 x 3 x 32 x 5 B = 14,400 B per block -> 582 blocks
    plugin._size_recall(FP8_COLD, cfg, 1 << 30)
    assert cfg.cache_config.num_gpu_blocks_override == (8 << 20) // 14_400
    cfg = _config()  # the preset keeps exact rows (the model's float32): 30 x 3 x 32 x 512 B = 1,474,560 B per block
    plugin._size_recall("recall-fp8", cfg, 1 << 30)
    assert cfg.cache_config.num_gpu_blocks_override == (1 << 30) // 1_474_560
    with pytest.raises(InvalidInput, match=r"cold_bytes=10000000 holds 6 blocks .* fewer than one 8192-token"):
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


# ---- pins: stamps in vLLM's pages ------------------------------------------------------------------------------
LEAN = 0.05  # how far each query leans towards its request's needle (more: attention is all on the needle)
PIN_FMT = "recall:m=16,k=4,w=32,sinks=4,pin=2,span=2"  # every fetched block a pin or its next


def _reference_pins(rf, q, k, length):
    """The blocks the row ``q [HQ, d]`` at ``length - 1`` pins, per KV head, written out: the blocks wholly before
    its window, each scored by the log-sum-exp of the row's logits over its tokens but the sinks (the group's heads
    by max), the ``pin`` best (checked for no near tie at the last one). ``[[blocks of head 0], ...]``."""
    m, g = rf.m, HQ // HKV
    nt = (length - rf.w) // m
    out = []
    for h in range(HKV):
        logits = (q.view(HKV, g, D)[h] @ k[: nt * m, h].T) * D ** -0.5  # [g, nt * m]
        logits[:, : rf.sinks] = float("-inf")
        lse = torch.logsumexp(logits.view(g, nt, m), -1).amax(0)  # [nt]
        ranked = lse.sort(descending=True).values
        assert ranked[rf.pin - 1] - ranked[rf.pin] > 1e-3, "a near tie at the last pin: pick another seed"
        out.append(sorted(lse.topk(rf.pin).indices.tolist()))
    return out


def _step(impl, cache, table, keys, vals, queries, work):
    """One engine step: ``work`` = ``[(request, first, end), ...]`` rows written (``do_kv_cache_update``) and
    attended (``forward``) for each request together, as vLLM's chunked prefill batches them. Returns the output."""
    m = impl.rf.m
    slot = lambda i, a, b: table[i, torch.arange(a, b) // m].long() * m + torch.arange(a, b) % m  # noqa: E731
    impl.do_kv_cache_update(None, torch.cat([keys[i][a:b] for i, a, b in work]),
                            torch.cat([vals[i][a:b] for i, a, b in work]), cache,
                            torch.cat([slot(i, a, b) for i, a, b in work]))
    q = torch.cat([queries[i][a:b] for i, a, b in work]).reshape(-1, HQ * D)
    qsl = torch.tensor([0, *torch.tensor([b - a for _, a, b in work]).cumsum(0).tolist()])
    meta = KvslimMetadata(num_actual_tokens=q.shape[0], query_start_loc=qsl,
                          seq_lens=torch.tensor([b for _, _, b in work]),
                          block_table=table[[i for i, _, _ in work]], slot_mapping=torch.empty(0))
    out = torch.empty_like(q)
    impl.forward(None, q, None, None, cache, meta, out)
    return out


def _pins_of(impl, cache, table, i, length):
    """The pins the backend reads for request ``i`` at ``length``: ``[[blocks of head 0], ...]``."""
    na = -(-length // impl.rf.m)
    pages = cache[table[i, :na].long()].reshape(na, HKV, -1)
    pinned, ok = impl.pins(pages, length)
    return [sorted(pinned[h][ok[h]].tolist()) for h in range(HKV)]


def _requests(lengths, seed, shared=0):
    """Keys, values and queries of requests with ``lengths`` (a needle key in each); the first ``shared`` tokens of
    every request are request 0's (a cached prefix). Each row's query leans towards its request's needle."""
    torch.manual_seed(seed)
    keys = [torch.randn(n, HKV, D) for n in lengths]
    vals = [torch.randn(n, HKV, D) for n in lengths]
    for k in keys:
        k[len(k) // 3] *= 4.0
    for x in (keys, vals):
        for t in x[1:]:
            t[:shared] = x[0][:shared]
    queries = [torch.randn(n, HQ, D) + LEAN * k[len(k) // 3].repeat_interleave(HQ // HKV, 0) for n, k in
               zip(lengths, keys)]
    return keys, vals, queries


def _table(rows, extra=4):
    """A block table of shuffled distinct blocks (block 0 is vLLM's null block); ``rows``: blocks per request."""
    perm = (torch.randperm(sum(rows) + extra) + 1).tolist()
    table = torch.zeros(len(rows), max(rows), dtype=torch.int32)
    for i, n in enumerate(rows):
        table[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return table, sum(rows) + extra + 1


def _impl_and_cache(fmt, nblocks):
    rf = parse_recall(fmt)
    impl = rb.KvslimRecallImpl(num_heads=HQ, head_size=D, scale=D ** -0.5, num_kv_heads=HKV)
    spec = rb.KvslimRecallBackend.customize_spec(
        FullAttentionSpec(block_size=rf.m, num_kv_heads=HKV, head_size=D, dtype=torch.float32))
    cache = torch.randint(0, 256, (nblocks, HKV, rf.m, spec.state_content_size_bytes), dtype=torch.uint8)
    return rf, impl, cache  # vLLM's pool is not zeroed: random bytes, so no test leans on zero pages


def _decode_and_check(rf, impl, cache, table, keys, vals, reqs, pins):
    """One decode step of ``reqs`` (a new token each) against the reference with ``pins`` per request."""
    q = {i: torch.randn(1, HQ, D) + LEAN * keys[i][len(keys[i]) // 3].repeat_interleave(HQ // HKV, 0) for i in reqs}
    for i in reqs:  # the new token's K/V
        keys[i] = torch.cat([keys[i], torch.randn(1, HKV, D)])
        vals[i] = torch.cat([vals[i], torch.randn(1, HKV, D)])
    n = {i: len(keys[i]) for i in reqs}
    rows = {i: torch.cat([torch.zeros(n[i] - 1, HQ, D), q[i]]) for i in reqs}  # the new token's query at its row
    out = _step(impl, cache, table, keys, vals, rows, [(i, n[i] - 1, n[i]) for i in reqs])
    qq = {i: q[i].reshape(HQ, D) for i in reqs}
    moved = False
    for row, i in enumerate(reqs):
        ref, _ = _reference_decode(rf, qq[i], keys[i], vals[i], pins[i])
        torch.testing.assert_close(out[row].view(HQ, D), ref, rtol=1e-4, atol=1e-4)
        if pins[i]:
            moved |= not torch.allclose(_reference_decode(rf, qq[i], keys[i], vals[i], None)[0], ref)
    assert moved or not any(pins[i] for i in reqs), "the pins change no selection here: the test would not see them"


def test_pins_are_the_last_prefill_rows_choice_in_a_chunked_batch(select):
    """Two requests prefilled together in uneven chunks (one ends with a one-row step, which selects as a decode
    does and pins nothing): each request's pins are those the reference computes from its last multi-row step's last
    row, a later chunk's stamp superseding an earlier one's; then a decode step of both fetches them first."""
    select(PIN_FMT)
    lengths = [300, 200]
    keys, vals, queries = _requests(lengths, seed=5)
    table, nblocks = _table([-(-(n + 1) // 16) for n in lengths])
    rf, impl, cache = _impl_and_cache(PIN_FMT, nblocks)
    for work in ([(0, 0, 100), (1, 0, 60)], [(0, 100, 230), (1, 60, 199)], [(0, 230, 300), (1, 199, 200)]):
        _step(impl, cache, table, keys, vals, queries, work)
    want = [_reference_pins(rf, queries[0][299], keys[0], 300), _reference_pins(rf, queries[1][198], keys[1], 199)]
    assert _pins_of(impl, cache, table, 0, 300) == want[0]
    assert _pins_of(impl, cache, table, 1, 200) == want[1]
    stale = impl.stamps(cache[table[0, 229 // 16].long()].reshape(1, HKV, -1))[0, :, 0]
    assert (stale == 229 % 16 + 1).all()  # the earlier chunk's stamp is still in its page, superseded
    assert rb.stats()["pin_stamps"] == 5  # 2 + 2 + 1 multi-row steps with blocks out of the window
    _decode_and_check(rf, impl, cache, table, keys, vals, [0, 1], want)
    assert rb.stats()["pinned_decodes"] == 3  # with the one-row prefill step of request 1


def test_requests_sharing_a_cached_prefix_get_their_own_pins(select):
    """B reuses A's first 10 blocks (prefix-cache hit: the same blocks in both tables) and prefills only its own
    tail; A's first chunk stamped inside the shared prefix. Each request reads its own last row's pins."""
    select(PIN_FMT)
    keys, vals, queries = _requests([190, 230], seed=7, shared=160)
    table, nblocks = _table([13, 16])
    table[1, :10] = table[0, :10]  # the shared prefix: blocks 0..9 of A
    rf, impl, cache = _impl_and_cache(PIN_FMT, nblocks)
    _step(impl, cache, table, keys, vals, queries, [(0, 0, 100)])
    _step(impl, cache, table, keys, vals, queries, [(0, 100, 190), (1, 160, 230)])
    want = [_reference_pins(rf, queries[0][189], keys[0], 190), _reference_pins(rf, queries[1][229], keys[1], 230)]
    assert want[0] != want[1]
    assert _pins_of(impl, cache, table, 0, 190) == want[0]
    assert _pins_of(impl, cache, table, 1, 230) == want[1]
    shared = impl.stamps(cache[table[0, 99 // 16].long()].reshape(1, HKV, -1))[0, :, 0]
    assert (shared == 99 % 16 + 1).all()  # A's first chunk's stamp lies in a block B holds too: not B's pins
    _decode_and_check(rf, impl, cache, table, keys, vals, [0, 1], want)


def test_a_reused_blocks_stale_stamp_is_not_read(select):
    """A's pins are stamped in the block of its last prompt row; vLLM frees A and hands that block (and the others)
    to C, which writes its rows there from the block's first slot on, with no multi-row step: C has no pins."""
    select(PIN_FMT)
    keys, vals, queries = _requests([200, 200], seed=11)
    table, nblocks = _table([13, 13])
    rf, impl, cache = _impl_and_cache(PIN_FMT, nblocks)
    _step(impl, cache, table, keys, vals, queries, [(0, 0, 200)])
    home = int(table[0, 199 // 16])
    assert _pins_of(impl, cache, table, 0, 200) == _reference_pins(rf, queries[0][199], keys[0], 200)
    table[1] = table[0][torch.randperm(13)]  # C gets A's blocks, A's home block at another index
    at = int((table[1] == home).nonzero())
    assert at * 16 + 199 % 16 < 200  # A's stamp would read as a position inside C's context
    assert _pins_of(impl, cache, table, 1, 200) != [[]] * HKV  # before C writes: the stale stamp is readable
    slot = table[1, torch.arange(200) // 16].long() * 16 + torch.arange(200) % 16
    for a in range(0, 200, 40):  # C's rows written (as a cache of one-row steps would); no forward
        impl.do_kv_cache_update(None, keys[1][a:a + 40], vals[1][a:a + 40], cache, slot[a:a + 40])
    assert _pins_of(impl, cache, table, 1, 200) == [[]] * HKV
    _decode_and_check(rf, impl, cache, table, keys, vals, [1], {1: None})
    assert rb.stats()["pinned_decodes"] == 0
