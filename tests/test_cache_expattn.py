"""Expected attention (``expattn``): scores against a direct computation, the closed forms it relies on, the tokens
the layer keeps, lossless at keep=1, bytes as predicted, bad parameters refused before anything is stored."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvslim import make_cache
from kvslim.cache.build import predict_nbytes
from kvslim.cache.method import ModelShape
from kvslim.cache.methods.evict.expattn import average_rotation, expected_scores
from kvslim.cache.methods.evict.layer import EvictLayer
from kvslim.cache.methods.evict.scores import select_keep
from kvslim.cache.recipe import parse_recipe
from kvslim.cache.rope import rotate
from kvslim.errors import InvalidInput
from kvslim.testing import tiny_gemma3, tiny_llama


def _rotation_matrix(f: float, inv_freq: torch.Tensor, d: int) -> torch.Tensor:
    """RoPE at position ``f`` as an explicit ``[d, d]`` matrix: its columns are the rotated basis vectors."""
    eye = torch.eye(d, dtype=torch.float64)[None, None]  # [1, 1, d, d]: d basis vectors as tokens
    cols = rotate(eye, torch.full((1, d), float(f)), inv_freq.double())  # [1, 1, d(vectors), d]
    return cols[0, 0].T


def _direct(qpre, pos_fut, k, v, inv_freq, scaling, sinks, use):
    """The paper's scores computed plainly, head by head, from the PRE-RoPE queries ``qpre [hq, s, d]``."""
    hq, _s, d = qpre.shape
    h, n = k.shape[0], k.shape[1]
    rbar = torch.stack([_rotation_matrix(f, inv_freq, d) for f in pos_fut]).mean(0)
    out = torch.zeros(h, n, dtype=torch.float64)
    for j in range(hq):
        x = qpre[j, use].double()
        mu = x.mean(0)
        cov = torch.cov(x.T, correction=0)
        m, c = rbar @ mu, rbar @ cov @ rbar.T
        kh = k[j // (hq // h)].double()
        logit = torch.tensor([scaling * (m @ kk) + scaling**2 / 2 * (kk @ c @ kk) for kk in kh])
        logit[:sinks] = -math.inf
        out[j // (hq // h)] += torch.softmax(logit, 0) / (hq // h)
    out = out * v.double().norm(dim=-1)
    out[:, :sinks] = math.inf
    return out


@pytest.mark.parametrize("rotated", [8, 6])  # full and partial rotary
def test_average_rotation_is_the_mean_of_the_rotation_matrices(rotated):
    d = 8
    inv_freq = 1.0 / (10.0 ** (torch.arange(0, rotated, 2, dtype=torch.float64) / rotated))
    start = torch.tensor([0, 13])
    got = average_rotation(inv_freq, start, 37, d)
    for i, p in enumerate(start.tolist()):
        want = torch.stack([_rotation_matrix(p + j, inv_freq, d) for j in range(37)]).mean(0)
        torch.testing.assert_close(got[i].double(), want, atol=1e-6, rtol=0)
    assert torch.equal(average_rotation(None, start, 37, d), torch.eye(d).expand(2, d, d))
    assert torch.allclose(average_rotation(inv_freq, start, 1, d)[1].double(), _rotation_matrix(13, inv_freq, d),
                          atol=1e-6)  # fmt: skip


def test_expected_logit_is_the_gaussian_moment_generating_function():
    """exp(s m.k + s^2/2 k^T C k) = E[exp(s q.k)] for q ~ N(m, C) (Monte Carlo, 400k samples)."""
    g = torch.Generator().manual_seed(0)
    d, s = 4, 0.5
    m = torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5
    c = a @ a.T
    k = torch.randn(3, d, generator=g, dtype=torch.float64)
    q = m + torch.randn(400_000, d, generator=g, dtype=torch.float64) @ a.T
    mc = torch.exp(s * q @ k.T).mean(0)
    closed = torch.exp(s * k @ m + s * s / 2 * torch.einsum("nd,de,ne->n", k, c, k))
    torch.testing.assert_close(mc, closed, rtol=0.02, atol=0)


def test_policy_scores_equal_a_direct_computation():
    """From post-RoPE queries (as the layer has them), the policy recovers the pre-RoPE statistics: its scores are
    the direct computation from the pre-RoPE queries, the sinks first (infinite)."""
    g = torch.Generator().manual_seed(1)
    hq, h, s, d, sinks, future = 4, 2, 12, 8, 2, 9
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    qpre = torch.randn(1, hq, s, d, generator=g)
    pos = torch.arange(s)[None]
    q = rotate(qpre, pos, inv_freq)
    k, v = torch.randn(1, h, s, d, generator=g), torch.rand(1, h, s, d, generator=g)
    policy = parse_recipe(f"expattn:keep=0.5,sinks={sinks},future={future}").method.policy()
    got = policy.call_scores(q, k, v, 0, 0.3, None, None, pos, None, inv_freq)
    use = torch.arange(s) >= sinks
    want = _direct(qpre[0], list(range(s, s + future)), k[0], v[0], inv_freq, 0.3, sinks, use)
    assert torch.isinf(got[0, :, :sinks]).all()
    torch.testing.assert_close(got[0, :, sinks:].double(), want[:, sinks:], atol=1e-6, rtol=1e-5)
    # a window of the last 5 queries only: statistics from those
    policy = parse_recipe(f"expattn:sinks={sinks},future={future},window=5").method.policy()
    got = policy.call_scores(q, k, v, 0, 0.3, None, None, pos, None, inv_freq)
    want = _direct(qpre[0], list(range(s, s + future)), k[0], v[0], inv_freq, 0.3, sinks, torch.arange(s) >= s - 5)
    torch.testing.assert_close(got[0, :, sinks:].double(), want[:, sinks:], atol=1e-6, rtol=1e-5)


def test_mean_only_and_no_value_norm_options():
    g = torch.Generator().manual_seed(2)
    mu, k, v = torch.randn(1, 2, 4, generator=g), torch.randn(1, 1, 6, 4, generator=g), torch.rand(1, 1, 6, 4)
    eye = torch.eye(4)[None]
    a = expected_scores(mu, None, eye, k, None, 1.0)
    want = torch.softmax(torch.einsum("bhd,bnd->bhn", mu, k[:, 0]), -1).mean(1)  # over the group of 2
    torch.testing.assert_close(a, want[:, None])
    b = expected_scores(mu, None, eye, k, v, 1.0, eps=0.5)
    torch.testing.assert_close(b, (want[:, None] + 0.5) * v.norm(dim=-1))
    masked = expected_scores(mu, None, eye, k, None, 1.0, keys_mask=torch.tensor([[False] * 6]))
    assert torch.equal(masked, torch.zeros(1, 1, 6))  # no open token: zero, not NaN


def test_left_padding_does_not_change_the_real_tokens_scores():
    """A left-padded row scores its real tokens as the same row alone (statistics over real queries, softmax over
    real keys, positions from the model), and its padding scores nothing."""
    g = torch.Generator().manual_seed(3)
    hq, h, m, pad, d = 4, 2, 10, 3, 8
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    qpre = torch.randn(1, hq, m, d, generator=g)
    k, v = torch.randn(1, h, m, d, generator=g), torch.rand(1, h, m, d, generator=g)
    pos = torch.arange(m)[None]
    policy = parse_recipe("expattn:keep=0.5,sinks=2,future=16").method.policy()
    alone = policy.call_scores(rotate(qpre, pos, inv_freq), k, v, 0, 0.25, None, None, pos, None, inv_freq)

    def padded(x):
        return torch.cat([torch.randn(*x.shape[:2], pad, x.shape[3], generator=g), x], 2)

    ppos = torch.cat([torch.ones(1, pad, dtype=torch.long), pos], 1)  # transformers gives padding position 1
    valid = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, m, dtype=torch.bool)], 1)
    got = policy.call_scores(rotate(padded(qpre), ppos, inv_freq), padded(k), padded(v), 0, 0.25, None, None, ppos,
                             valid, inv_freq)  # fmt: skip
    torch.testing.assert_close(got[..., pad:], alone)
    assert torch.equal(got[..., :pad], torch.zeros(1, h, pad))


def _gen(model, ids, cache, n=8, mask=None):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache=cache,
                              pad_token_id=0)


def _ids(n, seed=0):
    return torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_layer_keeps_exactly_the_best_scored_tokens():
    """On a tiny Llama: capture the pre-RoPE queries, score directly, and the layer holds exactly the keys / values
    of the reference cache at the top-budget indices (evicted tokens gone)."""
    model = tiny_llama()
    ids = _ids(48, seed=4)
    qs = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda _m, _i, out, i=i: qs.__setitem__(i, out))
             for i, layer in enumerate(model.model.layers)]  # fmt: skip
    full = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, cache=full, use_cache=True)
    for hk in hooks:
        hk.remove()
    cache = make_cache(model, "expattn:keep=0.25,future=32")
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    cfg = model.config
    inv_freq = model.model.rotary_emb.inv_freq.float()
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, EvictLayer)
        ref_k, ref_v = full.layers[i].keys, full.layers[i].values  # [1, h, 48, d]
        qpre = qs[i].reshape(1, 48, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        want = _direct(qpre[0], list(range(48, 80)), ref_k[0], ref_v[0], inv_freq, cfg.head_dim**-0.5, 4,
                       torch.arange(48) >= 4)  # fmt: skip
        # the policy, given the queries as the model rotates them (transformers' RoPE), scores as the direct way
        cos, sin = model.model.rotary_emb(qpre, torch.arange(48)[None])
        q_hf, _ = apply_rotary_pos_emb(qpre, qpre, cos, sin)
        got = layer.policy.call_scores(q_hf, ref_k, ref_v, 0, cfg.head_dim**-0.5, None, None, torch.arange(48)[None],
                                       None, layer.inv_freq)  # fmt: skip
        torch.testing.assert_close(got[..., 4:].double(), want[None, :, 4:], atol=1e-6, rtol=1e-4)
        idx = select_keep(want[None].float(), 12)
        assert layer.tail_k.n == layer.tail_v.n == 12
        for got, ref in ((layer.tail_k.decode(), ref_k), (layer.tail_v.decode(), ref_v)):
            torch.testing.assert_close(got, ref.gather(2, idx[..., None].expand(-1, -1, -1, ref.shape[-1])))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_keep_one_is_lossless_with_a_two_call_prefill(build):
    model = build()
    ids = _ids(60, seed=5)
    ref = _gen(model, ids, DynamicCache(config=model.config))
    cache = make_cache(model, "expattn")
    with torch.inference_mode():
        model(input_ids=ids[:, :40], cache=cache, use_cache=True)  # the context alone, then the rest
    assert torch.equal(_gen(model, ids, cache), ref)


@pytest.mark.parametrize("text", ["expattn:keep=0.5", "expattn:keep=0.25+tq4", "expattn:keep=0.125,cov=0+kivi2",
                                  "expattn:budget=20+fp8"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_bytes_equal_the_planner_and_later_tokens_are_appended(build, text):
    model = build()
    cache = make_cache(model, text)
    with torch.inference_mode():
        model(input_ids=_ids(90), cache=cache, use_cache=True)
    shape = ModelShape.from_model(model)
    assert [layer.nbytes(include_codec_state=False) for layer in cache.layers] == predict_nbytes(shape, text, 90)
    held = [layer.tail_k.n for layer in cache.layers if isinstance(layer, EvictLayer)]
    with torch.inference_mode():
        model(input_ids=_ids(7, seed=9), cache=cache, use_cache=True)  # the question: appended, one-shot method
    assert [layer.tail_k.n for layer in cache.layers if isinstance(layer, EvictLayer)] == [n + 7 for n in held]


@pytest.mark.parametrize("text,match", [
    ("expattn:keep=0", r"\(0, 1\]"),
    ("expattn:keep=1.5", r"\(0, 1\]"),
    ("expattn:future=0", "future must be positive"),
    ("expattn:sinks=-1", "sinks must be >= 0"),
    ("expattn:window=-3", "window must be >= 0"),
    ("expattn:cov=2", "cov must be 0 or 1"),
    ("expattn:vnorm=3", "vnorm must be 0 or 1"),
    ("expattn:eps=-0.1", "eps must be a finite number >= 0"),
    ("expattn:eps=nan", "eps must be a finite number >= 0"),
    ("expattn:eps=x", "must be a number"),
])
def test_bad_parameters_refused_when_parsed(text, match):
    with pytest.raises(InvalidInput, match=match):
        parse_recipe(text)


def test_budget_above_the_prompt_refused_before_storing():
    model = tiny_llama()
    cache = make_cache(model, "expattn:budget=500")
    with pytest.raises(InvalidInput, match="above the 40 tokens"), torch.inference_mode():
        model(input_ids=_ids(40), cache=cache, use_cache=True)
    assert all(not layer.is_initialized or layer.tail_k.n == 0 for layer in cache.layers)
