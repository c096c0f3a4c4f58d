"""A tap on a kvslim cache's forward calls: what each layer was given and what it returned.

:class:`kvslim.eval.harness.share.Recording` listens here to record one cache's context prefill and feed it to other caches
(see that module). While :data:`TAP` is unset (always, outside that recorder) each hook is one ``ContextVar.get``.

Why a ContextVar and not an argument: the hooks (``KvslimCache.update`` and the kvslim attention function) are
called by transformers' forward, from inside the model's own modules, with transformers' signatures; nothing kvslim
writes runs between ``model(...)`` and them, so a listener cannot be passed down to them. The tap only observes
(it never changes what a layer computes), and it is set only around the one forward a recording watches
(``Shared.prefill_context``). What the harness passes (chunking, which pool shares a prefill) travels in signatures:
:class:`kvslim.eval.harness.engine.PrefillPlan`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

__all__ = ["TAP"]

#: the active listener (``on_update(cache, layer_idx, k, v, args, kwargs)`` and ``on_attend(layer, query,
#: positions, valid_new, scaling, softcap, out)``), or None
TAP: ContextVar[Any] = ContextVar("kvslim_tap", default=None)
