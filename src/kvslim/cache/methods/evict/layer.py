"""The cache layer of the eviction baselines: exactly ``budget`` tokens per KV head, the rest deleted (not masked).

A policy (:class:`Policy` subclass: StreamingLLM, SnapKV, TOVA, H2O, key-norm, Expected Attention) gives a score
per held token (:meth:`Policy.call_scores` also hands it the values, RoPE positions and frequencies); the
layer keeps the best ``budget`` per KV head with :func:`kvslim.cache.methods.evict.scores.select_keep` (sinks and a recent window
always kept where the policy has them) and deletes the rest from its stores: kept keys (post-RoPE, so positions stay
right) and values are gathered per head, other tokens are gone.

When it compresses. The first forward call (the prefill) is attended in full, then compressed to
``budget = keep_budget(n, ratio, budget)``. After that, a *one-shot* policy (SnapKV, key-norm: the papers compress the
prompt once) appends every later token; a *continuous* policy (StreamingLLM, TOVA, H2O: the papers evict at every
step) evicts at the end of every call back to ``ceil(ratio * seen)`` tokens (or the fixed ``budget``). Prefilling a
document alone and the question in a second call therefore compresses question-agnostically (see
:mod:`kvslim.generation`). Until the first compression nothing is stored; kept tokens are then encoded through the
storage codec (``none`` keeps the model dtype, which makes ``ratio = 1`` token-identical to ``DynamicCache``).

Method files (``kvslim/cache/methods/evict/{streaming,snapkv,tova,h2o,knorm,expattn}.py``) each hold its parameters
(an :class:`EvictParams` subclass: every field declared once, there), a policy that reads them (``self.params``)
and an :class:`EvictMethod` naming both; this module is what they share: the layer (on
:class:`~kvslim.cache.base.BaseLayer`'s attention template, whose exact tail store holds the kept tokens: it stages
the call's tokens, attends over held + new in one pass and evicts in ``finish``), its spec and its byte prediction.

Index letters: b batch, h KV head, g query heads per KV head, s queries of the call, n tokens, d dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ....errors import InvalidInput
from ...base import BaseLayer, LayerSpec, View, grouped_attention, stream_nbytes
from ...method import Method, Params, param
from .scores import causal_probs, check_ratio, keep_budget, select_keep

__all__ = ["EvictLayer", "EvictMethod", "EvictParams", "EvictSpec", "Policy", "keep_param", "kept_tokens"]

_CHUNK = 256  # queries per probability chunk (accumulating policies)


@dataclass(frozen=True)
class Policy:
    """What a method decides: scores per token, protected sinks / recent tokens, one-shot or continuous.

    ``params``: the method's :class:`EvictParams` (validated there), the one place its fields are declared; the
    policy reads them (``ratio`` is ``keep`` in (0, 1], ``budget`` > 0 tokens wins when given). Subclasses set
    ``continuous`` and override :meth:`scores` (and :meth:`protect`, :meth:`check_prompt` where the paper has sinks
    or a window); an :class:`EvictMethod` names its policy class in ``policy_class``.
    """

    params: Any
    continuous = False
    accumulates = False  # keeps a running score per held token (H2O)

    @property
    def ratio(self) -> float:
        return self.params.keep

    @property
    def budget(self) -> int:
        return self.params.budget

    def check_prompt(self, n: int) -> None:
        """Refuse a first call of ``n`` tokens the method cannot compress (budget above it, window longer)."""
        keep_budget(n, self.ratio, self.budget)

    def target(self, seen: int) -> int:
        """Tokens to hold after a call, ``seen`` tokens in (continuous policies and the first compression)."""
        if self.budget:
            return min(self.budget, seen)
        return max(1, min(seen, math.ceil(self.ratio * seen - 1e-9)))

    def protect(self, budget: int) -> tuple[int, int]:
        """``(sinks, recent)`` kept whatever their score."""
        return 0, 0

    def scores(self, q: torch.Tensor, k: torch.Tensor, held: int, scaling: float, softcap: float | None,
               acc: torch.Tensor | None) -> torch.Tensor:
        """Scores ``[b, h, n]`` of the ``n = held + s`` tokens (``k [b, h, n, d]``; queries ``q [b, h*g, s, d]`` at
        columns ``held..n-1``); ``acc [b, h, n]``: the running scores (accumulating policies)."""
        raise NotImplementedError

    def call_scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, held: int, scaling: float,
                    softcap: float | None, acc: torch.Tensor | None, pos: torch.Tensor, valid_q: torch.Tensor | None,
                    inv_freq: torch.Tensor | None) -> torch.Tensor:
        """Scores ``[b, h, n]`` with everything the layer has: also the values ``v [b, h, n, d]``, the RoPE positions
        ``pos [b, s]`` of the call's queries, their validity ``valid_q [b, s]`` (None: no padding) and the layer's
        RoPE inverse frequencies (None without RoPE). Default: :meth:`scores` (policies that read attention only)."""
        return self.scores(q, k, held, scaling, softcap, acc)


def kept_tokens(policy: Policy, calls: list[int]) -> int:
    """Tokens a layer holds (per KV head) after forward calls of ``calls`` tokens each (what the planner prices)."""
    held = seen = 0
    for i, n in enumerate(calls):
        seen += n
        held += n
        if i == 0 or policy.continuous:
            held = min(held, policy.target(seen))
    return held


def _gather(packed: Any, idx: torch.Tensor) -> Any:
    """Per-head gather of tokens ``idx [b, h, k]`` from a packed value (plain tensor, tuple, or ``Packed``)."""
    b, h, k = idx.shape
    if isinstance(packed, torch.Tensor):
        return packed.gather(2, idx[..., None].expand(b, h, k, packed.shape[-1]))
    if isinstance(packed, tuple):
        return tuple(_gather(p, idx) for p in packed)
    from dataclasses import replace

    fields = {n: f.gather(2, idx[..., None].expand(b, h, k, f.shape[-1])) for n, f in packed.fields.items()}
    return replace(packed, fields=fields, shape=(b, h, k, packed.shape[-1]))


def keep_param() -> float:
    return param(1.0, "fraction of the tokens kept per layer and KV head, in (0, 1] (1: every token, lossless)")


def budget_param() -> int:
    return param(0, "fixed tokens kept per layer and KV head instead of keep (0: use keep)", lo=0)


@dataclass(frozen=True)
class EvictParams(Params):
    """Base of the eviction methods' parameters: ``keep`` in (0, 1] and ``budget`` >= 0 (subclasses declare them)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.keep, f"{self.method}: keep")
        if self.budget and self.keep != 1.0:  # budget replaces keep: both given, one would be silently ignored
            raise InvalidInput(f"{self.method}: give keep or budget, not both: budget={self.budget} keeps a fixed "
                               f"token count and would ignore keep={self.keep:g}")


@dataclass
class EvictView(View):
    """An eviction call's view: ``tail_k``/``tail_v`` the held tokens and the new ones (``k_new``/``v_new``), their
    validity ``[b, h, n]`` (None: no padding seen), the call's positions and validity for the policy; the query,
    scaling and softcap are noted by :meth:`EvictLayer.attend_view` for :meth:`EvictLayer.finish`."""

    k_new: torch.Tensor
    v_new: torch.Tensor
    held: int
    valid: torch.Tensor | None
    call: tuple[torch.Tensor, torch.Tensor | None]
    query: torch.Tensor | None = None
    scaling: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class EvictSpec(LayerSpec):
    """A global layer of an eviction method: its :class:`Policy` (storage codec in ``codec``)."""

    policy: Any = None

    def layer_class(self) -> type[EvictLayer]:
        return EvictLayer


class EvictMethod(Method):
    """Shared by the eviction methods: lossless at ``keep=1``, not chunk-invariant (scores depend on the calls),
    continuous policies refused with append-only formats (KIVI keys share scales per 32 tokens)."""

    family = "evict"
    lossless = ({"keep": 1.0},)
    chunk_invariant = False
    shares_context_prefill = True  # the first call attends in full, then compresses (EvictLayer.attend)
    policy_class: type[Policy] = Policy  # what the method decides, reading its parameters (declared once, in Params)

    def policy(self) -> Policy:
        return self.policy_class(self.params)

    def check(self, shape: Any) -> list[str]:
        from ....formats import REGISTRY

        problems = super().check(shape)
        fmt = REGISTRY.get(self.codec)
        if self.policy().continuous and fmt is not None and fmt.append_only:
            problems.append(f"{self.name} evicts at every step, but {self.codec} stores keys in groups of tokens "
                            "(append-only): use a per-token codec (tq*, fp8, fp16)")
        return problems

    def global_spec(self, index: int) -> EvictSpec:
        return EvictSpec(codec=self.codec, label=self.name, policy=self.policy())


class EvictLayer(BaseLayer):
    """The tokens a :class:`Policy` keeps, per KV head, in the base layer's tail stores (through the spec's codec);
    ``valid [b, h, n]`` once padding was seen, ``acc [b, h, n]`` the running scores of accumulating policies."""

    shares_context_prefill = True  # plain_first_call / absorb: a recorded first call is taken, not recomputed

    def __repr__(self) -> str:
        return f"EvictLayer({self.spec.label})"

    def reset(self) -> None:
        super().reset()
        self.calls = 0
        self._known: torch.Tensor | None = None  # absorb: the call's output, computed by another layer

    def init_state(self) -> None:
        self.policy = self.spec.policy
        self.valid: torch.Tensor | None = None
        self.acc = torch.zeros(self.batch, self.heads, 0, device=self.device) if self.policy.accumulates else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.calls == 0 and self.pending is None:
            self.spec.policy.check_prompt(key_states.shape[2])  # before anything is stored
        return super().update(key_states, value_states, *args, **kwargs)

    def stored_length(self) -> int:
        return self.tail_k.n if self.is_initialized else 0

    def stores(self) -> list[Any]:
        return [self.tail_k, self.tail_v]

    def side_tensors(self) -> list[str]:
        return ["valid", "acc"]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("eviction caches cannot be cropped (evicted tokens are gone)")

    @classmethod
    def predict(cls, spec: EvictSpec, n: int, shape: Any, batch: int = 1) -> dict[str, int]:
        """After one unpadded prefill of ``n`` tokens: ``kept_tokens(policy, [n])`` per KV head through the codec,
        plus the running scores (float32) of accumulating policies; FLOPs of one decode step: attention over the kept
        tokens, plus the scoring pass of continuous policies."""
        pol = spec.policy
        kept = kept_tokens(pol, [n]) if n else 0
        kv = stream_nbytes(shape, spec.codec, shape.head_dim, kept, batch)
        side = 4 * batch * shape.kv_heads * kept if pol.accumulates else 0
        flops = 4 * batch * shape.heads * shape.head_dim * kept
        if pol.continuous:
            flops += 2 * batch * shape.heads * shape.head_dim * (kept + 1)
        return {"stored": kv + side, "read": kv, "flops": flops}

    # ---- attention and eviction (the base template: take_pending -> prepare -> attend_view -> finish) ----------
    def take_pending(self, query: torch.Tensor, positions: Any, valid_new: torch.Tensor | None) -> int:
        """The call's new tokens stay staged (nothing is stored before the policy has chosen, in :meth:`finish`)."""
        k_new, v_new = self.pending
        self.pending = None
        self._call_in = (query, k_new, v_new, positions, valid_new)
        return self.seen - query.shape[2]

    def prepare(self, q: int, p0: int) -> EvictView:
        """The held tokens (decoded) and the new ones as one segment, with its validity ``[b, h, n]`` once padding
        was seen."""
        query, k_new, v_new, positions, valid_new = self._call_in
        self._call_in = None
        b, s, h = query.shape[0], q, self.heads
        held = self.tail_k.n
        k_old, v_old = self.tail_k.decode(), self.tail_v.decode()
        k_all = k_new if k_old is None else torch.cat([k_old, k_new], 2)
        v_all = v_new if v_old is None else torch.cat([v_old, v_new], 2)
        if valid_new is not None and not bool(valid_new.all()) and self.valid is None:
            self.valid = torch.ones(b, h, held, dtype=torch.bool, device=self.device)
        valid = None
        if self.valid is not None:
            new = valid_new if valid_new is not None else torch.ones(b, s, dtype=torch.bool, device=self.device)
            valid = torch.cat([self.valid, new[:, None].expand(b, h, s)], 2)  # [b, h, n]
        pos = positions  # RoPE positions of the call's tokens (default: the columns after what was seen)
        if pos is None:
            pos = torch.arange(self.seen - s, self.seen, device=self.device)[None]
        return EvictView(q, p0, None, None, k_all, v_all, k_new, v_new, held, valid, (pos.expand(b, s), valid_new))

    def attend_view(self, query: torch.Tensor, view: EvictView, scaling: float, softcap: float | None) -> torch.Tensor:
        """Every query over the held tokens and the new ones up to itself (stock causal sdpa for a first call
        without padding or softcap); an absorbed call's output is the one given. ``-> [b, s, h*g, d]``."""
        view.query, view.scaling, view.softcap = query, scaling, softcap  # what finish scores with
        s, n, held, valid = view.q, view.held + view.q, view.held, view.valid
        if self._known is not None:  # absorb: a plain first call's output, computed by another layer
            return self._known
        if held == 0 and valid is None and softcap is None:
            return torch.nn.functional.scaled_dot_product_attention(
                query, view.tail_k, view.tail_v, is_causal=s > 1, scale=scaling, enable_gqa=True
            ).transpose(1, 2)
        mask = None
        if s > 1 or valid is not None:
            cols = torch.arange(n, device=self.device)
            mask = (cols[None, :] <= held + torch.arange(s, device=self.device)[:, None])[None, None]  # [1,1,s,n]
            if valid is not None:
                mask = mask & valid[:, :, None, :]
        out, _ = grouped_attention(query, view.tail_k, view.tail_v, mask, scaling, softcap)
        return out

    def finish(self, view: EvictView) -> None:
        """The policy keeps its budget of held + new tokens; the rest are deleted."""
        self._store(view.query, view.tail_k, view.tail_v, view.k_new, view.v_new, view.valid, view.scaling,
                    view.softcap, view.call)  # fmt: skip

    def plain_first_call(self, valid_new: torch.Tensor | None, softcap: float | None) -> bool:
        """Whether the coming call is a first call without padding or softcap: its output is then
        ``scaled_dot_product_attention(query, k_new, v_new, is_causal)`` of the call's own inputs, whatever the
        policy and codec (nothing is held, nothing encoded before the output)."""
        fresh = self.calls == 0 and (not self.is_initialized or (self.tail_k.n == 0 and self.valid is None))
        return fresh and softcap is None and (valid_new is None or bool(valid_new.all()))

    def absorb(self, query: torch.Tensor, positions: Any, valid_new: torch.Tensor | None, scaling: float,
               softcap: float | None, out: torch.Tensor) -> None:
        """Store a plain first call (:meth:`plain_first_call`) whose output ``out`` another eviction layer computed
        from the same inputs (:mod:`kvslim.eval.harness.share`): what :meth:`attend` does, less recomputing that output."""
        if self.pending is None or not self.plain_first_call(valid_new, softcap):
            raise ValueError("absorb takes a plain first call only (no tokens held, no padding, no softcap)")
        self._known = out
        try:
            self.attend(query, positions, valid_new, scaling, softcap)
        finally:
            self._known = None

    def _store(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, k_new: torch.Tensor,
               v_new: torch.Tensor, valid: torch.Tensor | None, scaling: float, softcap: float | None,
               call: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        pol = self.policy
        first = self.calls == 0
        self.calls += 1
        held, s = self.tail_k.n, k_new.shape[2]
        acc = None
        if pol.accumulates:
            acc = torch.cat([self.acc, self.acc.new_zeros(*self.acc.shape[:2], s)], 2)
            for a in range(0, s, _CHUNK):
                e = min(s, a + _CHUNK)
                acc = acc + causal_probs(q[:, :, a:e], k_all, scaling, softcap, valid, first=held + a).sum((2, 3))
        target = pol.target(self.seen) if (first or pol.continuous) else held + s
        if target >= held + s:  # nothing to evict: append the new tokens as they are
            self.tail_k.append(k_all if first else k_new)
            self.tail_v.append(v_all if first else v_new)
            self.acc, self.valid = acc, valid if self.valid is not None else None
            return
        sc = pol.call_scores(q, k_all, v_all, held, scaling, softcap, acc, *call, self.inv_freq)
        idx = select_keep(sc, target, *pol.protect(target), valid=valid)  # [b, h, target]
        if first:  # nothing stored yet: encode the kept tokens only
            self.tail_k.append(_gather(k_all, idx))
            self.tail_v.append(_gather(v_all, idx))
        else:
            self.tail_k.append(k_new)
            self.tail_v.append(v_new)
            for st in (self.tail_k, self.tail_v):
                st.packed = _gather(st.packed, idx)
                st.n = target
        if acc is not None:
            self.acc = acc.gather(2, idx)
        if valid is not None:
            self.valid = valid.gather(2, idx)
