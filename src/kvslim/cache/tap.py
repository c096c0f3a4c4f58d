"""A tap on a kvslim cache's forward calls: what each layer was given and what it returned.

:class:`kvslim.eval.harness.share.Recording` listens here to record one cache's context prefill and feed it to other caches
(see that module). While :data:`TAP` is unset (always, outside that recorder) each hook is one ``ContextVar.get``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

__all__ = ["TAP"]

#: the active listener (``on_update(cache, layer_idx, k, v, args, kwargs)`` and ``on_attend(layer, query,
#: positions, valid_new, scaling, softcap, out)``), or None
TAP: ContextVar[Any] = ContextVar("kvslim_tap", default=None)
