"""The cache layer of the eviction baselines: exactly ``budget`` tokens per KV head, the rest deleted (not masked).

A policy (:class:`Policy` subclass: StreamingLLM, SnapKV, TOVA, H2O, key-norm) gives a score per held token; the
layer keeps the best ``budget`` per KV head with :func:`kvslim.cache.scores.select_keep` (sinks and a recent window
always kept where the policy has them) and deletes the rest from its stores: kept keys (post-RoPE, so positions stay
right) and values are gathered per head, other tokens are gone.

When it compresses. The first forward call (the prefill) is attended in full, then compressed to
``budget = keep_budget(n, ratio, budget)``. After that, a *one-shot* policy (SnapKV, key-norm: the papers compress the
prompt once) appends every later token; a *continuous* policy (StreamingLLM, TOVA, H2O: the papers evict at every
step) evicts at the end of every call back to ``ceil(ratio * seen)`` tokens (or the fixed ``budget``). Prefilling a
document alone and the question in a second call therefore compresses question-agnostically (see
:mod:`kvslim.generation`). Until the first compression nothing is stored; kept tokens are then encoded through the
storage codec (``none`` keeps the model dtype, which makes ``ratio = 1`` token-identical to ``DynamicCache``).

Index letters: b batch, h KV head, g query heads per KV head, s queries of the call, n tokens, d dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .attend import grouped_attention
from .registry import register_output
from .scores import causal_probs, check_ratio, keep_budget, select_keep
from .storage import Store, packed_nbytes

__all__ = ["EvictLayer", "Policy", "kept_tokens"]

_CHUNK = 256  # queries per probability chunk (accumulating policies)


@dataclass(frozen=True)
class Policy:
    """What a method decides: scores per token, protected sinks / recent tokens, one-shot or continuous.

    ``ratio`` in (0, 1] or ``budget`` > 0 tokens (which wins when given). Subclasses set ``continuous`` and
    override :meth:`scores` (and :meth:`protect`, :meth:`check_prompt` where the paper has sinks or a window).
    """

    ratio: float = 1.0
    budget: int = 0
    continuous = False
    accumulates = False  # keeps a running score per held token (H2O)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.budget < 0:
            from ..errors import InvalidInput

            raise InvalidInput(f"token budget must be positive (0: use the keep ratio), got {self.budget}")

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


class EvictLayer(CacheLayerMixin):
    """A transformers cache layer holding the tokens a :class:`Policy` keeps, through the codec ``codec_factory``
    builds (``codec_factory(dim, role)``)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self, policy: Policy, codec_factory: Any) -> None:
        super().__init__()
        self.policy = policy
        self.codec_factory = codec_factory
        self.reset()

    def __repr__(self) -> str:
        return f"EvictLayer({type(self.policy).__name__})"

    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.calls = 0
        self.keys = self.values = None  # never held: stored data lives in the stores
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device, self.batch, self.heads, self.dim = key_states.dtype, key_states.device, b, h, d
        ck, cv = self.codec_factory(d, "key"), self.codec_factory(d, "value")
        self.codecs = [ck] if cv is ck else [ck, cv]
        if self.policy.continuous and type(ck).__name__ == "KiviCodec":
            from ..errors import InvalidInput

            raise InvalidInput(f"{type(self.policy).__name__} evicts at every step, but KIVI stores keys in groups "
                               "of 32 tokens (append-only): use a per-token codec (tq*, fp8, fp16)")
        self.k, self.v = Store(ck, self.dtype), Store(cv, self.dtype)
        self.valid: torch.Tensor | None = None  # [b, h, n] bool, only once padding was seen
        self.acc = torch.zeros(b, h, 0, device=self.device) if self.policy.accumulates else None
        self.is_initialized = True

    # ---- transformers cache-layer protocol -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Record the new post-RoPE ``[b, h, s, d]`` states; :meth:`attend` stores them. Returns them unchanged."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError("a kvslim cache layer was updated twice without attending: the model is not using "
                               "the 'kvslim' attention (build the cache with kvslim.make_cache)")
        if self.calls == 0:
            self.policy.check_prompt(key_states.shape[2])  # before anything is stored
        self.pending = (key_states, value_states)
        self.seen += key_states.shape[2]
        register_output(key_states, self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def stored_length(self) -> int:
        return self.k.n if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("eviction caches cannot be cropped (evicted tokens are gone)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def _select(self, fn: Any) -> None:
        if not self.is_initialized:
            return
        self.k.select_batch(fn)
        self.v.select_batch(fn)
        for name in ("valid", "acc"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def offload(self) -> None:
        return None

    def prefetch(self) -> None:
        return None

    def nbytes(self, include_codec_state: bool = True) -> int:
        """Bytes held: packed kept K/V, the padding mask (once padding was seen), H2O's running scores, and (unless
        the cache counts shared codecs itself) the codecs' constants."""
        if not self.is_initialized:
            return 0
        total = self.k.nbytes() + self.v.nbytes()
        total += sum(packed_nbytes(t) for t in (self.valid, self.acc) if t is not None)
        if include_codec_state:
            total += sum(int(c.state_nbytes()) for c in self.codecs)
        return total

    # ---- attention and eviction ------------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, positions: Any, valid_new: torch.Tensor | None, scaling: float,
               softcap: float | None) -> torch.Tensor:
        """Attend ``query [b, h*g, s, d]`` over the held tokens and the new ones, then store / evict.
        Returns ``[b, s, h*g, d]``."""
        k_new, v_new = self.pending
        self.pending = None
        b, hq, s, d = query.shape
        h = self.heads
        held = self.k.n
        k_old, v_old = self.k.decode(), self.v.decode()
        k_all = k_new if k_old is None else torch.cat([k_old, k_new], 2)
        v_all = v_new if v_old is None else torch.cat([v_old, v_new], 2)
        n = held + s
        if valid_new is not None and not bool(valid_new.all()) and self.valid is None:
            self.valid = torch.ones(b, h, held, dtype=torch.bool, device=self.device)
        valid = None
        if self.valid is not None:
            new = valid_new if valid_new is not None else torch.ones(b, s, dtype=torch.bool, device=self.device)
            valid = torch.cat([self.valid, new[:, None].expand(b, h, s)], 2)  # [b, h, n]
        if held == 0 and valid is None and softcap is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, k_all, v_all, is_causal=s > 1, scale=scaling, enable_gqa=True
            ).transpose(1, 2)
        else:
            mask = None
            if s > 1 or valid is not None:
                cols = torch.arange(n, device=self.device)
                mask = (cols[None, :] <= held + torch.arange(s, device=self.device)[:, None])[None, None]  # [1,1,s,n]
                if valid is not None:
                    mask = mask & valid[:, :, None, :]
            out, _ = grouped_attention(query, k_all, v_all, mask, scaling, softcap)
        self._store(query, k_all, v_all, k_new, v_new, valid, scaling, softcap)
        return out

    def _store(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, k_new: torch.Tensor,
               v_new: torch.Tensor, valid: torch.Tensor | None, scaling: float, softcap: float | None) -> None:
        pol = self.policy
        first = self.calls == 0
        self.calls += 1
        held, s = self.k.n, k_new.shape[2]
        acc = None
        if pol.accumulates:
            acc = torch.cat([self.acc, self.acc.new_zeros(*self.acc.shape[:2], s)], 2)
            for a in range(0, s, _CHUNK):
                e = min(s, a + _CHUNK)
                acc = acc + causal_probs(q[:, :, a:e], k_all, scaling, softcap, valid, first=held + a).sum((2, 3))
        target = pol.target(self.seen) if (first or pol.continuous) else held + s
        if target >= held + s:  # nothing to evict: append the new tokens as they are
            if first:
                self.k.append(k_all)
                self.v.append(v_all)
            else:
                self.k.append(k_new)
                self.v.append(v_new)
            self.acc, self.valid = acc, valid if self.valid is not None else None
            return
        sc = pol.scores(q, k_all, held, scaling, softcap, acc)
        idx = select_keep(sc, target, *pol.protect(target), valid=valid)  # [b, h, target]
        if first:  # nothing stored yet: encode the kept tokens only
            self.k.append(_gather(k_all, idx))
            self.v.append(_gather(v_all, idx))
        else:
            self.k.append(k_new)
            self.v.append(v_new)
            for st in (self.k, self.v):
                st.packed = _gather(st.packed, idx)
                st.n = target
        if acc is not None:
            self.acc = acc.gather(2, idx)
        if valid is not None:
            self.valid = valid.gather(2, idx)
