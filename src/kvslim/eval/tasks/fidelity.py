"""Fidelity: how far a compressed cache moves the model's next-token distributions on natural text.

A cell prefills ``length`` tokens of ``pydoc_data.topics`` prose, then feeds the next ``eval_tokens`` tokens one at a
time through the cache (the decode path) and collects the next-token distribution at each of those positions. Against
the same procedure with a plain ``DynamicCache`` (the uncompressed model) it reports

* ``score`` = mean KL(p_full || p_recipe) over the ``eval_tokens`` positions, in nats (0 for the full cache);
* ``ppl`` = exp(mean negative log-likelihood of the actual next tokens) under the recipe, and ``ppl_full``.

No chat template (it is text continuation); ``success`` is null. The reference distributions are computed once per
prompt and process, then reused for every recipe.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..harness.engine import ONE_CALL, PrefillPlan, _forward, prefill
from .base import Task, task_rng
from .haystack import pydoc_sentences, tokens_starting_at
from .prompt import Prompt, frame_for

__all__ = ["Fidelity", "next_token_logprobs"]


def next_token_logprobs(model: Any, ids: list[int], targets: list[int], cache: Any,
                        plan: PrefillPlan = ONE_CALL) -> tuple[Any, int]:
    """Log-softmax ``[len(targets), V]`` of the distributions predicting each target, and the bytes after prefill
    (fed as ``plan`` says)."""
    import torch

    pre = prefill(model, ids, cache, plan=plan)
    rows = [torch.log_softmax(pre.last_logits, -1)]
    with torch.inference_mode():
        for tok in targets[:-1]:
            rows.append(torch.log_softmax(_forward(model, [tok], cache, keep=1)[-1], -1))
    return torch.stack(rows), pre.kv_bytes


@dataclass
class Fidelity(Task):
    """Options: ``eval_tokens`` (positions scored after the context)."""

    eval_tokens: int = 64
    _refs: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    name = "fidelity"
    uses_depth = False
    has_success = False

    def options(self) -> dict[str, Any]:
        return {"eval_tokens": self.eval_tokens}

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, 0.0)
        sentences = pydoc_sentences()
        bos = list(frame_for(tokenizer, chat=False).prefix)
        text, _ = tokens_starting_at(tokenizer, sentences, rng.randrange(len(sentences)), length + self.eval_tokens - len(bos))
        ids = bos + text
        return Prompt(ids[:length], [], [], len(bos), length - len(bos), answers=[], answer_ids=ids[length:],
                      max_new_tokens=self.eval_tokens)

    def _reference(self, model: Any, prompt: Prompt, plan: PrefillPlan = ONE_CALL) -> Any:
        """The uncompressed distributions, computed once per prompt (prefilled as the first cell's ``plan`` says)."""
        from transformers import DynamicCache

        key = (id(model), prompt.hash)
        if key not in self._refs:
            lp, _ = next_token_logprobs(model, prompt.ids, prompt.answer_ids, DynamicCache(config=model.config), plan)
            self._refs[key] = lp
            while len(self._refs) > 2:
                self._refs.popitem(last=False)
        return self._refs[key]

    def run(self, model: Any, tokenizer: Any, prompt: Prompt, make_cache: Any, plan: PrefillPlan = ONE_CALL) -> dict[str, Any]:
        import torch

        ref = self._reference(model, prompt, plan)
        lp, kv_bytes = next_token_logprobs(model, prompt.ids, prompt.answer_ids, make_cache(), plan)
        tgt = torch.tensor(prompt.answer_ids)
        idx = torch.arange(len(tgt))
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        nll, nll_full = float(-lp[idx, tgt].mean()), float(-ref[idx, tgt].mean())
        return {
            "success": None,
            "score": round(max(kl, 0.0), 6),
            "ppl": round(math.exp(nll), 4),
            "ppl_full": round(math.exp(nll_full), 4),
            "answer": "",
            "kv_bytes": kv_bytes,
        }
