"""``expattn``: Expected Attention (Devoto, Jeblick, Jegou 2025, arXiv:2510.00636, sec. 3): score each token by the
attention the *future* queries are expected to pay it, times its value norm.

The attention future queries pay is unknown when the prompt is compressed (and in a question-agnostic prefill the
question has not been seen), so the paper models the pre-RoPE queries as Gaussian, ``q ~ N(mu, Sigma)``, estimated
from the queries of the prefill (the first ``sinks`` left out: attention-sink outliers). A future query at
position ``f`` is ``R(f) q`` (RoPE, a rotation); averaging the rotation over the next ``future`` positions,
``Rbar = mean_f R(f)``, gives the future query's distribution ``N(Rbar mu, Rbar Sigma Rbar^T)``, and the expected
unnormalised attention of key ``k`` (the Gaussian's moment generating function) is

    E[exp(s q.k)] = exp(s (Rbar mu).k + s^2/2 k^T (Rbar Sigma Rbar^T) k)        (s: the attention scaling)

normalised over the tokens (a softmax of those logits), averaged over each KV head's query group, then weighted by
the value's norm, ``(a + eps) * ||v||``: the token's expected contribution to the attention output. The first
``sinks`` tokens are always kept; each KV head keeps the ``ceil(keep * n)`` best-scored tokens (or a fixed
``budget``). As the paper's prefill compression, one-shot: the first call is compressed, later tokens appended, so
prefilling a document alone compresses it question-agnostically. No recent window (the paper has none).

Why this method and not KVzip (Kim et al. 2025): KVzip scores tokens by the attention a second forward pass gets
when the model is made to *reconstruct* the whole context, which doubles the prefill work (more with its chunked
repeat prompt) and needs the model inside the cache; expected attention costs one small statistics pass per layer
on tensors the layer already has (``O(n d^2)`` per head, no extra forward), which fits a CPU.

Here the queries the statistics need are the layer's post-RoPE queries un-rotated with the layer's own RoPE
frequencies (so models with q-norm, Gemma 3, work unchanged), and the average rotation is computed in closed form
(a Dirichlet kernel per frequency, so ``future`` costs nothing). Logit soft-capping is not modelled. Not
implemented: the paper's head-adaptive budgets and its compression during decoding. Layer:
:class:`~kvslim.cache.methods.evict.layer.EvictLayer`. Index letters: b batch, h KV head, g query heads per KV head, s queries,
n tokens, d head dim, r rotated dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ....errors import InvalidInput
from ...method import param, register
from ...rope import rotate
from .layer import EvictMethod, EvictParams, Policy, budget_param, keep_param

__all__ = ["ExpAttnParams", "ExpectedAttention", "ExpectedAttentionPolicy", "average_rotation", "expected_scores",
           "query_statistics"]  # fmt: skip


def query_statistics(q: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean ``[b, hq, d]`` and covariance ``[b, hq, d, d]`` (population, float32) of queries
    ``q [b, hq, s, d]`` with per-query weights ``weights [b, s]`` (>= 0, each row summing to 1)."""
    qf = q.float()
    w = weights.float()[:, None, :, None]  # [b, 1, s, 1]
    mu = (qf * w).sum(2)
    c = qf - mu[:, :, None]
    cov = torch.einsum("bhsi,bhsj->bhij", c * w, c)
    return mu, cov


def average_rotation(inv_freq: torch.Tensor | None, start: torch.Tensor, future: int, dim: int) -> torch.Tensor:
    """``Rbar [b, d, d]`` (float32): the RoPE rotation averaged over the positions ``start .. start + future - 1``
    (``start [b]``), in the ``rotate_half`` layout of :func:`kvslim.cache.rope.rotate` (the first ``r = 2 *
    len(inv_freq)`` dims rotated in pairs ``(i, i + r/2)``, the rest unchanged). Identity without RoPE.

    Per frequency ``t`` the mean of ``exp(i t f)`` over the positions is ``exp(i t (start + (future-1)/2)) *
    sin(t future / 2) / (future sin(t / 2))`` (a Dirichlet kernel), computed in float64.
    """
    b = start.shape[0]
    eye = torch.eye(dim, dtype=torch.float64, device=start.device)
    rbar = eye.expand(b, dim, dim).clone()
    if inv_freq is None:
        return rbar.float()
    t = inv_freq.to(device=start.device, dtype=torch.float64)  # [r/2]
    half, m = t.shape[0], float(future)
    den = m * torch.sin(t / 2)
    amp = torch.where(den.abs() < 1e-300, torch.ones_like(t), torch.sin(t * m / 2) / den)  # t -> 0: amplitude 1
    phase = (start.to(torch.float64)[:, None] + (m - 1) / 2) * t  # [b, r/2]
    c, s = amp * torch.cos(phase), amp * torch.sin(phase)
    i = torch.arange(half, device=start.device)
    rbar[:, i, i] = c
    rbar[:, i + half, i + half] = c
    rbar[:, i, i + half] = -s
    rbar[:, i + half, i] = s
    return rbar.float()


def expected_scores(mu: torch.Tensor, cov: torch.Tensor | None, rbar: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor | None, scaling: float, keys_mask: torch.Tensor | None = None,
                    eps: float = 0.0) -> torch.Tensor:
    """Expected-attention scores ``[b, h, n]`` (float32) of keys ``k [b, h, n, d]``.

    ``mu [b, hq, d]`` / ``cov [b, hq, d, d]`` (None: mean only): the pre-RoPE query statistics; ``rbar [b, d, d]``:
    the averaged future rotation. Logits ``s (Rbar mu).k + s^2/2 k^T Rbar cov Rbar^T k`` are softmaxed over the
    tokens where ``keys_mask [b, n]`` (or ``[b, h, n]``) is True (elsewhere the score is 0; a row with none gets 0),
    averaged over each KV head's ``g`` query heads, then ``(a + eps) * ||v||`` when ``v`` is given.
    """
    b, h, n, d = k.shape
    hq = mu.shape[1]
    g = hq // h
    kf = k.float()
    mean = torch.einsum("bij,bhj->bhi", rbar, mu.float()).reshape(b, h, g, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", mean, kf) * scaling
    if cov is not None:
        sig = (rbar[:, None] @ cov.float() @ rbar[:, None].transpose(-1, -2)).reshape(b, h, g, d, d)
        logits = logits + torch.einsum("bhnd,bhgde,bhne->bhgn", kf, sig, kf) * (scaling * scaling / 2)
    if keys_mask is not None:
        km = keys_mask[:, None] if keys_mask.ndim == 2 else keys_mask  # [b, h|1, n]
        logits = logits.masked_fill(~km[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no open token: all zero
    a = probs.mean(2)  # [b, h, n]
    if v is not None:
        a = (a + eps) * torch.linalg.vector_norm(v.float(), dim=-1)
    return a


@dataclass(frozen=True)
class ExpectedAttentionPolicy(Policy):
    def call_scores(self, q, k, v, held, scaling, softcap, acc, pos, valid_q, inv_freq):
        if held:  # one-shot: only the first call (nothing held yet) is scored
            raise RuntimeError("expected attention scores the first call only; tokens were held already")
        b, _hq, s, d = q.shape
        p = self.params
        real = valid_q if valid_q is not None else torch.ones(b, s, dtype=torch.bool, device=q.device)
        qp = q if inv_freq is None else rotate(q, -pos, inv_freq)  # the pre-RoPE queries
        use = real & (pos >= p.sinks)
        if p.window:
            use &= torch.arange(s, device=q.device)[None] >= s - p.window
        use = torch.where(use.any(1, keepdim=True), use, real)  # a prompt of sinks only: every real query
        w = use.float()
        mu, cov = query_statistics(qp, w / w.sum(1, keepdim=True).clamp_min(1))
        last = torch.where(real, pos, torch.full_like(pos, -1)).amax(1)  # [b] the last real position
        rbar = average_rotation(inv_freq, last + 1, p.future, d)
        sink = real & (pos < p.sinks)
        sc = expected_scores(mu, cov if p.cov else None, rbar, k, v if p.vnorm else None, scaling,
                             keys_mask=real & ~sink, eps=float(p.eps))  # fmt: skip
        return sc.masked_fill(sink[:, None], float("inf"))  # the sinks always kept (the best scores)


@dataclass(frozen=True)
class ExpAttnParams(EvictParams):
    keep: float = keep_param()
    budget: int = budget_param()
    future: int = param(512, "future query positions the RoPE rotation is averaged over (paper: 512)", lo=1)
    sinks: int = param(4, "first tokens always kept and left out of the query statistics (paper: 4)", lo=0)
    window: int = param(0, "the last prefill queries the statistics use (0: every query after the sinks, paper)",
                        lo=0)
    cov: int = param(1, "1: the queries' mean and covariance (paper); 0: the mean only", choices=(0, 1))
    vnorm: int = param(1, "1: weight the expected attention by the value norm (paper); 0: attention only",
                       choices=(0, 1))
    eps: float = param(0.0, "added to the expected attention before the value-norm weighting, >= 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) or self.eps < 0:
            raise InvalidInput(f"expattn: eps must be a finite number >= 0, got {self.eps!r}")


@register
class ExpectedAttention(EvictMethod):
    name = "expattn"
    summary = "Expected Attention: future queries' expected attention (Gaussian queries, averaged RoPE) x value norm"
    Params = ExpAttnParams
    policy_class = ExpectedAttentionPolicy
    examples = ({"keep": 0.5}, {"keep": 0.25, "sinks": 2, "window": 8, "cov": 0, "future": 64})
