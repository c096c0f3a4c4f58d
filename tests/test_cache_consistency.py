"""Lossy recipes: chunking invariance, continuation after decode, positions after eviction, and bytes held."""

from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.cache import compressed

LOSSY = [
    "window:w=8,sinks=2",
    "window:w=5,sinks=0",
    "blocks:m=4,k=2,w=8,sinks=2",
    "blocks:m=3,k=0,w=6,sinks=1,overlap=2,pool=norm",
    "heavy:m=8,w=8",
    "v4:w=8,m=2,k=3,hm=6",
    "latent:r=6",
    "window:w=8+fp8",
    "v4:w=8,m=2,k=3,hm=6+tq3",
    "blocks:m=4,k=2,w=8+fp4",  # (tq2.5 calibrates outliers on the first chunk, KIVI groups: not chunk-invariant)
]


def _logits_in_chunks(model, recipe, ids, sizes, explicit_positions=False):
    out = []
    with compressed(model, recipe) as cache, torch.inference_mode():
        start = 0
        for size in sizes:
            chunk = ids[:, start : start + size]
            kw = {}
            if explicit_positions:
                kw["position_ids"] = torch.arange(start, start + chunk.shape[1])[None]
            out.append(model(chunk, cache=cache, **kw).logits)
            start += size
        assert cache.get_seq_length() == ids.shape[1]
    return torch.cat(out, dim=1)


def _has_codec(recipe: str) -> bool:
    return "+" in recipe


def _recorded_one_shot(model, recipe, ids):
    """One-shot prefill of ``ids`` with every layer's calls recorded (:class:`kvslim.eval.harness.share.Recording`)."""
    from kvslim.cache.tap import TAP
    from kvslim.eval.harness.share import Recording

    with compressed(model, recipe) as cache, torch.inference_mode():
        rec = Recording(cache)
        token = TAP.set(rec)
        try:
            model(ids, cache=cache)
        finally:
            TAP.reset(token)
        return rec, _stored_tensors(cache)


def _stored_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a cache's stores hold (packed codes, scales, float rows), in a fixed order."""
    out: list[torch.Tensor] = []

    def walk(obj, depth=0):
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o, depth + 1)
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(obj[key], depth + 1)
        elif type(obj).__name__ in ("Store", "Packed"):
            for key in sorted(vars(obj)):
                if key not in ("codec", "out_dtype"):
                    walk(vars(obj)[key], depth + 1)

    for layer in cache.layers:
        for key in sorted(vars(layer)):
            value = vars(layer)[key]
            if type(value).__name__ == "Store" or (isinstance(value, (list, tuple)) and value
                                                   and type(value[0]).__name__ == "Store"):  # fmt: skip
                walk(value)
    return out


def _replay_in_chunks(model, recipe, rec, sizes):
    """Feed the recorded one-shot calls (bit-identical keys, values and queries) to a fresh cache ``sizes`` tokens
    at a time, layer by layer as the model calls them; returns each attend's outputs joined along the tokens, and
    the tensors the cache's stores hold."""
    outs: dict[int, list[torch.Tensor]] = {}
    with compressed(model, recipe) as cache, torch.inference_mode():
        start = 0
        for size in sizes:
            sl = slice(start, start + size)
            for ev in rec.events:
                if ev[0] == "update":
                    _, i, k, v, args, kwargs = ev
                    inner = dict(kwargs.get("kwargs", {}))
                    if inner.get("position_ids") is not None:
                        inner["position_ids"] = inner["position_ids"][:, sl]
                    kw = {**kwargs, "kwargs": inner} if "kwargs" in kwargs else kwargs
                    cache.update(k[:, :, sl].clone(), v[:, :, sl].clone(), i, *args, **kw)
                else:
                    _, i, q, pos, valid, scaling, softcap, _out = ev
                    assert valid is None
                    got = cache.layers[i].attend(q[:, :, sl].clone(), None if pos is None else pos[:, sl],
                                                 None, scaling, softcap)  # fmt: skip
                    outs.setdefault(i, []).append(got)
            start += size
        assert cache.get_seq_length() == sum(sizes)
        return {i: torch.cat(o, dim=1) for i, o in outs.items()}, _stored_tensors(cache)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("recipe", LOSSY)
def test_one_shot_equals_chunked_equals_token_by_token(tiny_models, arch, recipe):
    """Through the model. A recipe without a codec is float rounding only. With a codec, the keys and values a
    token-by-token forward computes differ from one-shot ones in the last bits (other SIMD kernels), so a value
    on a quantization boundary may take the neighbouring code (more often under some ATEN_CPU_CAPABILITY than
    others): compare the codes, a share of which may flip, never the logits (see the replay test below for the
    exact check of the cache itself)."""
    model = tiny_models[arch]
    ids = torch.randint(1, 128, (1, 41), generator=torch.Generator().manual_seed(7))
    one = _logits_in_chunks(model, recipe, ids, [41])
    chunked = _logits_in_chunks(model, recipe, ids, [5, 11, 1, 7, 17])
    steps = _logits_in_chunks(model, recipe, ids, [1] * 41)
    if not _has_codec(recipe):
        torch.testing.assert_close(chunked, one, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(steps, one, atol=2e-4, rtol=1e-4)
        return
    _, codes_one = _recorded_one_shot(model, recipe, ids)
    for sizes in ([5, 11, 1, 7, 17], [1] * 41):
        with compressed(model, recipe) as cache, torch.inference_mode():
            start = 0
            for size in sizes:
                model(ids[:, start : start + size], cache=cache)
                start += size
            codes = _stored_tensors(cache)
        assert [c.shape for c in codes] == [c.shape for c in codes_one] and codes
        # a flipped code (or a float field rounded to the neighbouring 8/16-bit value) is one element off; a wrong
        # row, order or position would move most of them
        off = sum(int((~_close(a, b)).sum()) for a, b in zip(codes, codes_one))
        total = sum(a.numel() for a in codes)
        assert off <= 0.02 * total, f"{off} of {total} stored elements differ from one-shot's (sizes {sizes[:3]}...)"


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal codes (1-byte fields), or floats within float rounding of their inputs."""
    if a.element_size() == 1:
        return a.view(torch.uint8) == b.view(torch.uint8)
    return torch.isclose(a.float(), b.float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("recipe", LOSSY)
def test_cache_is_chunk_invariant_on_identical_inputs(tiny_models, arch, recipe):
    """The cache itself, fed the very keys, values and queries of a one-shot forward in chunks (5/11/1/7/17 and
    one token at a time): every stored code and float row equals one-shot's bit for bit, and every layer's
    attention output equals one-shot's to float tolerance. Independent of the CPU: the inputs are bit-identical and
    every chunk-invariant codec encodes a row alone (tests/test_quant_codecs.py)."""
    model = tiny_models[arch]
    ids = torch.randint(1, 128, (1, 41), generator=torch.Generator().manual_seed(7))
    rec, stored_one = _recorded_one_shot(model, recipe, ids)
    outs_one = {ev[1]: ev[7] for ev in rec.events if ev[0] == "attend"}
    for sizes in ([41], [5, 11, 1, 7, 17], [1] * 41):
        outs, stored = _replay_in_chunks(model, recipe, rec, sizes)
        assert len(stored) == len(stored_one) and stored
        for a, b in zip(stored, stored_one):
            if _has_codec(recipe):  # bit-identical rows in: bit-identical codes out
                assert a.shape == b.shape and torch.equal(a, b), f"stored codes differ in chunks {sizes[:3]}..."
            else:  # float rows (a latent projection or a pooled mean of another batch shape rounds differently)
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert sorted(outs) == sorted(outs_one)
        for i, out in outs.items():
            torch.testing.assert_close(out, outs_one[i], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_positions_after_eviction_are_logical(tiny_models, arch):
    """After eviction the cache stores fewer tokens than it has seen; positions must still count every token."""
    model = tiny_models[arch]
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(8))
    implicit = _logits_in_chunks(model, "window:w=6,sinks=2", ids, [20, 3, 17])
    explicit = _logits_in_chunks(model, "window:w=6,sinks=2", ids, [20, 3, 17], explicit_positions=True)
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)
    with compressed(model, "window:w=6,sinks=2") as cache, torch.inference_mode():
        model(ids, cache=cache)
        layer = next(lay for lay in cache.layers if lay.spec.label == "window")
        assert cache.get_seq_length() == 40 and layer.stored_length() == 2 + 6 - 1
        kv_len, kv_off = layer.get_mask_sizes(1)
        assert (kv_len, kv_off) == (7 + 1, 40 - 7)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("recipe", ["blocks:m=4,k=2,w=8,sinks=2", "v4:w=8,m=2,k=3,hm=6"])
def test_prefill_decode_more_prefill(tiny_models, arch, recipe):
    """generate, then generate again on (prompt + answer + more text) with the same cache == one fresh pass."""
    model = tiny_models[arch]
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(1, 128, (1, 23), generator=g)
    more = torch.randint(1, 128, (1, 9), generator=g)
    with compressed(model, recipe) as cache, torch.inference_mode():
        first = model.generate(prompt, max_new_tokens=10, do_sample=False, cache=cache, pad_token_id=0)
        full = torch.cat([first, more], dim=1)
        second = model.generate(full, max_new_tokens=10, do_sample=False, cache=cache, pad_token_id=0)
    with compressed(model, recipe) as fresh, torch.inference_mode():
        ref_first = model.generate(prompt, max_new_tokens=10, do_sample=False, cache=fresh, pad_token_id=0)
        assert torch.equal(ref_first, first)
        ref_logits = _logits_in_chunks(model, recipe, full, [full.shape[1]])
    with compressed(model, recipe) as chunked, torch.inference_mode():
        model(full[:, :-1], cache=chunked)
        step = model(full[:, -1:], cache=chunked).logits
    torch.testing.assert_close(step[:, -1], ref_logits[:, -1], atol=2e-4, rtol=1e-4)
    assert second.shape[1] == full.shape[1] + 10 and torch.equal(second[:, : full.shape[1]], full)


def test_bytes_held_match_the_layout(tiny_models):
    model = tiny_models["llama"]  # 2 layers, 2 KV heads, head dim 16, float32
    ids = torch.randint(1, 128, (1, 50), generator=torch.Generator().manual_seed(10))
    per_vec = 16 * 4
    with compressed(model, "window:w=8,sinks=2") as cache, torch.inference_mode():
        model(ids, cache=cache)
        stored = 2 + 8 - 1
        assert cache.layer_nbytes() == [stored * (2 * 2 * per_vec + 1)] * 2
        assert kvslim.cache_nbytes(cache) == cache.nbytes()
    with compressed(model, "blocks:m=4,k=2,w=8,sinks=2") as cache, torch.inference_mode():
        model(ids, cache=cache)
        layer = cache.layers[0]
        n_blocks = (50 - 8 + 1 - 2) // 4
        tail = 50 - (2 + n_blocks * 4)
        assert layer.n_blocks == n_blocks and layer.tail_k.n == tail
        expect = (2 + n_blocks + tail) * 2 * 2 * per_vec + (2 + n_blocks + tail) + 4 * tail
        assert layer.nbytes() == expect
    d = 16
    with compressed(model, "full+fp8") as cache, torch.inference_mode():
        model(ids, cache=cache)
        assert cache.layers[0].nbytes() == 50 * 2 * 2 * (d + 4 * 1) + 50
    with compressed(model, "full+tq3") as cache, torch.inference_mode():
        model(ids, cache=cache)
        layer = cache.layers[0]
        state = sum(c.state_nbytes() for c in layer.codecs)
        data = 50 * 2 * 2 * ((d * 3 + 7) // 8 + 2) + 50
        assert layer.nbytes() == data + state
        # one codec (rotation, codebook) serves both layers and both streams: its constants are held once
        assert cache.layers[1].codecs[0] is layer.codecs[0] and len(layer.codecs) == 1
        assert cache.layer_nbytes() == [data + state, data] and cache.nbytes() == 2 * data + state


def test_refusals_before_allocation():
    from kvslim.testing import tiny_llama

    model = tiny_llama()  # fresh: a refused recipe must leave it untouched
    with pytest.raises(kvslim.InvalidInput, match="exceeds the model's head dim 16"):
        kvslim.make_cache(model, "latent:r=32")
    with pytest.raises(kvslim.InvalidInput, match="full_first=9 exceeds"):
        kvslim.make_cache(model, "heavy:full_first=9")
    with pytest.raises(kvslim.InvalidInput, match="AttentionInterface"):
        kvslim.make_cache(torch.nn.Linear(2, 2), "full")
    assert model.config._attn_implementation == "sdpa"


def test_observed_attention_pooling_uses_the_queries(tiny_models):
    model = tiny_models["llama"]
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(11))
    outs = {}
    for pool in ("mean", "attn"):
        with compressed(model, f"blocks:m=4,k=0,w=8,sinks=2,pool={pool}") as cache, torch.inference_mode():
            outs[pool] = model(ids, cache=cache).logits
            layer = cache.layers[0]
            if pool == "attn":
                # every window token has received attention mass from the queries seen so far
                assert layer.obs.shape[-1] == layer.tail_k.n and bool((layer.obs > 0).all())
    assert torch.isfinite(outs["attn"]).all()
    assert not torch.allclose(outs["attn"], outs["mean"])


@pytest.mark.parametrize("recipe", ["blocks:m=4,k=5,w=8,sinks=2", "full", "latent:r=8"])
def test_long_prefill_crosses_query_chunks(tiny_models, recipe):
    """A 700-token one-shot prefill is attended in several query chunks; it must equal feeding 100 at a time."""
    model = tiny_models["llama"]
    ids = torch.randint(1, 128, (1, 700), generator=torch.Generator().manual_seed(12))
    one = _logits_in_chunks(model, recipe, ids, [700])
    chunked = _logits_in_chunks(model, recipe, ids, [100] * 7)
    torch.testing.assert_close(chunked, one, atol=2e-4, rtol=1e-4)


def test_window_storage_follows_wq(tiny_models):
    """Compressed layers keep their exact window 16-bit unless wq=1; entries always go through the codec."""
    model = tiny_models["llama"]
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(13))
    names = {}
    for wq in (0, 1):
        with compressed(model, f"blocks:m=4,k=2,w=8,wq={wq}+tq3") as cache, torch.inference_mode():
            model(ids, cache=cache)
            layer = cache.layers[0]
            names[wq] = (type(layer.tail_k.codec).__name__, type(layer.blk_k.codec).__name__)
            assert layer.tail_k.decode().dtype == torch.float32 and layer.n_blocks > 0
    assert names[0] == ("PlainCodec", "TurboQuantMSE") and names[1] == ("TurboQuantMSE", "TurboQuantMSE")
