"""One context prefill for every eviction recipe of a prompt: record one cache's prefill, feed it to the others.

In a question-agnostic grid every recipe first prefills the same context. An eviction cache (a recipe whose method
declares ``shares_context_prefill``, :func:`kvslim.cache.recipe.shares_context_prefill`: StreamingLLM, SnapKV, TOVA,
H2O, key-norm, Expected Attention) attends over that whole first call at model precision and compresses only
afterwards, so all of them run the same model computation and differ only in what they keep. Given a
:class:`Shared` pool in its plan (``PrefillPlan.shared``, which the grid runner gives to the recipes that declare the
capability), :func:`kvslim.eval.harness.engine.prefill` therefore:

* records, from the first such cache that prefills a context alone in one call, what each of its layers was given
  (``update``: the new post-RoPE keys and values; ``attend``: the queries, positions, padding, scale and softcap)
  and what each returned (:mod:`kvslim.cache.tap`);
* feeds the next such cache on the same model and context those calls layer by layer (``cache.update`` then the
  layer's attention, in the order the model made them) instead of running the model, and makes sure every layer's
  output equals the recorded one bit for bit. A layer class that declares ``shares_context_prefill`` (the eviction
  layer) outputs, on a first call without padding or softcap, ``scaled_dot_product_attention`` of the call's own
  inputs, whatever the policy or codec (its ``plain_first_call``,
  :meth:`~kvslim.cache.methods.evict.layer.EvictLayer.plain_first_call`); both caches being fresh and both layers
  declaring it, the recorded layer took that same path on the same inputs, so the output is equal by construction
  and the layer only scores, selects and stores (its ``absorb``,
  :meth:`~kvslim.cache.methods.evict.layer.EvictLayer.absorb`). Every other layer (Gemma 3's local windows) attends
  again and its output is compared with the recorded one (``torch.equal``).

Equal outputs at every layer mean the model, run on this cache, would have computed exactly the recorded inputs
(layer 0's come from the embeddings; each later layer's from the earlier outputs, all equal), so the cache ends in
the state a forward pass leaves. At the first output that differs (a codec that changes what a local layer
attends over, say) the replay is abandoned and the context runs through the model as usual, on a copy of the cache
taken before the replay touched it; that forward pass is recorded in turn and feeds the recipes after it (Gemma 3's
eviction + codec compositions, whose local layers all hold 16 bits, share among themselves), and the pair (recipe,
recipe recorded) is not tried again. A replayed prefill is reported
(:attr:`Prefilled.shared`), and the records of the harness say ``shared_prefill``; nothing else about them changes.

One recording (the last context) is held at a time: on SmolLM2 at 4k tokens about 0.8 GB, on Gemma 3 at 8k 1.5 GB.

The pool travels explicitly (in the plan, through the task's ``run``, to ``prefill``). Only the recording itself
listens through :data:`kvslim.cache.tap.TAP`: the calls it records are made by transformers' forward, inside the
model, where no kvslim signature runs between ``prefill`` and the cache layers (see that module).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

__all__ = ["Recording", "Shared", "shared_prefill"]


class Recording:
    """The calls one kvslim cache's layers received during one forward, and what they returned (a tap listener)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.index = {id(layer): i for i, layer in enumerate(cache.layers)}
        self.events: list[tuple] = []

    def on_update(self, cache: Any, layer_idx: int, k: Any, v: Any, args: tuple, kwargs: dict) -> None:
        if cache is self.cache:
            self.events.append(("update", layer_idx, k.clone(), v.clone(), args, kwargs))

    def on_attend(self, layer: Any, query: Any, positions: Any, valid_new: Any, scaling: float, softcap: Any,
                  out: Any) -> None:  # fmt: skip
        i = self.index.get(id(layer))
        if i is not None:
            pos = positions.clone() if positions is not None else None
            valid = valid_new.clone() if valid_new is not None else None
            self.events.append(("attend", i, query.clone(), pos, valid, scaling, softcap, out.clone()))

    def replay(self, cache: Any) -> bool:
        """Feed the recorded calls to ``cache`` (fresh, of the same model); False at the first layer output that
        differs from the recorded one (``cache`` is then part-filled: throw it away)."""
        import torch

        from ...cache.registry import layer_for

        if len(cache.layers) != len(self.cache.layers):
            return False
        with torch.inference_mode():
            for ev in self.events:
                if ev[0] == "update":
                    _, i, k, v, args, kwargs = ev
                    key, _ = cache.update(k.clone(), v.clone(), i, *args, **kwargs)
                    if layer_for(key) is not cache.layers[i]:
                        return False
                else:
                    _, i, q, pos, valid, scaling, softcap, out = ev
                    layer = cache.layers[i]
                    if (layer.shares_context_prefill and self.cache.layers[i].shares_context_prefill
                            and layer.plain_first_call(valid, softcap)):  # fmt: skip
                        # both fresh (prefill_context) and both declaring the capability: the recorded layer took
                        # the same plain first call, whose output is sdpa of these very inputs: equal by
                        # construction, not recomputed
                        layer.absorb(q.clone(), pos, valid, scaling, softcap, out)
                        continue
                    got = layer.attend(q.clone(), pos, valid, scaling, softcap)
                    if got.shape != out.shape or got.dtype != out.dtype or not torch.equal(got, out):
                        return False
        return True


class Shared:
    """A pool of shared context prefills, one per grid run (``PrefillPlan.shared``): the last context's recording
    and the recipes whose replay failed."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.recording: Recording | None = None
        self.failed: set[tuple[int, str, str]] = set()  # (model, recipe, recipe recorded)
        self.replayed = 0

    def prefill_context(self, model: Any, ids: list[int], cache: Any, forward: Any) -> tuple[Any, bool]:
        """Put ``ids`` (a context, one call) into ``cache``: by replay when this context was recorded and the
        recipe can share it, else with ``forward(cache)`` (recorded when the recipe can be shared). Returns the
        cache that holds it (a copy of ``cache`` when a replay failed) and whether it was replayed."""
        from ...cache.tap import TAP

        if not getattr(cache, "shares_context_prefill", False) or cache.get_seq_length():
            forward(cache)  # a cache that does not declare the capability, or not fresh: run the model
            return cache, False
        key = (id(model), tuple(ids))
        name = (id(model), str(cache.recipe), str(self.recording.cache.recipe) if self.recording else "")
        if self.key == key and self.recording is not None and name not in self.failed:
            spare = copy.deepcopy(cache)  # before anything is stored: cheap
            if self.recording.replay(cache):
                self.replayed += 1
                return cache, True
            self.failed.add(name)
            cache = spare
        # a new context, or one the recording cannot feed to this recipe: run the model, recorded (the newest
        # recording feeds the recipes after it); free the old recording first
        self.key, self.recording = None, None
        rec = Recording(cache)
        token = TAP.set(rec)
        try:
            forward(cache)
        finally:
            TAP.reset(token)
        self.key, self.recording = key, rec
        return cache, False

    def clear(self) -> None:
        """Drop the recording (its memory); the pool can be used again."""
        self.key = self.recording = None


@contextlib.contextmanager
def shared_prefill(enabled: bool = True) -> Iterator[Shared | None]:
    """A :class:`Shared` pool for the block, its recording dropped at the end (None when not ``enabled``). Nothing
    is set for the block: the pool shares only where it is passed, in a plan (``prefill(..., plan=PrefillPlan(
    shared=pool))``)."""
    if not enabled:
        yield None
        return
    shared = Shared()
    try:
        yield shared
    finally:
        shared.clear()
