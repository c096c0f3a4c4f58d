"""Greedy generation with a measured KV cache.

``generate(model, tokenizer, prompt)`` formats the prompt (the chat template when the tokenizer has one), checks it
against the model's maximum context, runs ``model.generate`` greedily with an explicit cache object, and reports the
answer, the speed and the bytes the cache holds at the end (measured from its tensors).

When to compress: a compressing cache (an eviction method such as SnapKV) compresses at the end of each prefill call.
``generate(..., prompt)`` prefills the whole prompt in one call, so the cache has seen the question when it
compresses (question-aware). ``generate(..., prompt=question, context=document)`` prefills the document alone first
and then continues with the question (question-agnostic: what a server that caches a shared document prefix must
do). The model reads the same user message either way: the context, a blank line, the prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ContextTooLong, InvalidInput
from .memory import cache_nbytes

__all__ = ["GenerateResult", "encode_prompt", "encode_split", "check_context", "generate", "prefill"]


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    kv_bytes: int
    cache: Any = field(default=None, repr=False)
    kv_tokens: int = 0  # tokens the cache has seen (prompt + generated - 1)
    kv_full16_bytes: int = 0  # what a stock 16-bit DynamicCache holds for kv_tokens, computed from the config
    kv_cold_bytes: int = 0  # tiered caches: bytes in the cold tier (kv_bytes is the hot tier)
    kv_fetched_last_step: int = 0  # cold bytes the last decode step fetched (all layers)

    @property
    def kv_ratio(self) -> float:
        """Bytes held relative to a 16-bit full cache (< 1 means smaller)."""
        return self.kv_bytes / self.kv_full16_bytes if self.kv_full16_bytes else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "kv_bytes": self.kv_bytes,
            "kv_tokens": self.kv_tokens,
            "kv_full16_bytes": self.kv_full16_bytes,
            "kv_ratio_vs_full16": round(self.kv_ratio, 4),
            "kv_cold_bytes": self.kv_cold_bytes,
            "kv_fetched_last_step": self.kv_fetched_last_step,
        }


def max_context(model: Any) -> int:
    from .hf_config import read

    return read(model.config).max_context


def check_context(n_tokens: int, model: Any, what: str = "prompt") -> None:
    """Refuse ``n_tokens`` above the model's maximum context, naming both numbers."""
    limit = max_context(model)
    if limit and n_tokens > limit:
        raise ContextTooLong(f"{what} needs {n_tokens} tokens but the model's maximum context is {limit} tokens")


def encode_prompt(tokenizer: Any, prompt: str, chat: bool | None = None) -> Any:
    """Token ids ``[1, T]`` for ``prompt``; uses the chat template when there is one (or when ``chat`` is True)."""
    from .paths import check_text

    check_text(prompt or "", "the prompt")
    if not prompt or not prompt.strip():
        raise InvalidInput("the prompt is empty: give some text to continue or answer")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput("this tokenizer has no chat template: run without --chat")
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def encode_split(tokenizer: Any, context: str, question: str, chat: bool | None = None) -> tuple[Any, int]:
    """Token ids ``[1, T]`` of the user message "context, blank line, question" (in the chat template when there
    is one) and the index where the question part starts. The two parts are tokenised separately, so the split is exact.
    """
    from .paths import check_text

    for name, text in (("context", context), ("question", question)):
        check_text(text or "", f"the {name}")
        if not text or not text.strip():
            raise InvalidInput(f"the {name} is empty: give some text")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    head, tail = "", ""
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput("this tokenizer has no chat template: run without --chat")
        mark = "\x00KVSLIM-CONTENT\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False)
        head, _sep, tail = text.partition(mark)
    first = list(tokenizer(head + context, add_special_tokens=not use_chat)["input_ids"])
    rest = list(tokenizer("\n\n" + question + tail, add_special_tokens=False)["input_ids"])
    import torch

    return torch.tensor([first + rest], dtype=torch.long), len(first)


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    cache: Any = None,
    chat: bool | None = None,
    continue_cache: bool = False,
    context: str | None = None,
) -> GenerateResult:
    """Greedy generation of at most ``max_new_tokens`` tokens after ``prompt``.

    ``cache`` is any transformers ``Cache`` (a kvslim compressed cache too); by default a fresh ``DynamicCache``.
    The cache is returned in the result so its bytes can be inspected further. A cache that already holds tokens is
    refused unless ``continue_cache=True``: then ``prompt`` continues the context the cache holds (its tokens are
    appended after the cached ones). A kvslim cache built for another model is refused too. ``context``: a document
    prefilled into the cache on its own before ``prompt`` (the question) is seen; a compressing cache then compresses
    it question-agnostically (see the module docstring). ``context`` with ``continue_cache=True`` and a cache that
    already holds it (:func:`prefill`, or a fork of such a cache: ``cache.fork()``) feeds only the question: the
    cache must hold exactly the context's tokens.
    """
    import torch
    from transformers import DynamicCache

    from .units import check_int

    check_int(max_new_tokens, "max_new_tokens")
    if context is None:
        ids, split = encode_prompt(tokenizer, prompt, chat), 0
    else:
        ids, split = encode_split(tokenizer, context, prompt, chat)
    n_prompt = int(ids.shape[1])
    past = 0
    if cache is not None:
        from .cache.guard import check_consistent, check_model

        check_model(cache, model)
        check_consistent(cache)  # any cache: one an exception left part-way through a forward is refused
        past = int(cache.get_seq_length())
        if past and not continue_cache:
            raise InvalidInput(
                f"the cache already holds {past} tokens of an earlier context: pass a fresh cache, or "
                "continue_cache=True to continue that context"
            )
    held = bool(split and past)  # the cache holds the context already (prefill / a fork): only the question is fed
    if held and past != split:
        raise InvalidInput(f"the cache holds {past} tokens but the context is {split} tokens: with context= a "
                           "continued cache must hold exactly that context (kvslim.prefill, or a fork of its cache)")
    if held:
        past, split = 0, 0
    what = f"the prompt ({n_prompt} tokens) plus {max_new_tokens} new tokens" + (f" after {past} cached" if past else "")
    check_context(past + n_prompt + max_new_tokens, model, what=what)
    if past:  # the cached positions are never fed again; any id stands for them in generate's input
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.cat([torch.full((1, past), pad, dtype=ids.dtype), ids], dim=1)
    if cache is None:
        cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if split:  # the context alone first: the cache compresses it before the question arrives
            model(input_ids=ids[:, past : past + split], cache=cache, use_cache=True, logits_to_keep=1)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            cache=cache,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    seconds = time.perf_counter() - t0
    from .hf_config import full16_nbytes

    seen = int(cache.get_seq_length())
    new = out[0, past + n_prompt :]
    tiers = cache.tier_nbytes() if callable(getattr(cache, "tier_nbytes", None)) else {}
    return GenerateResult(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        prompt_tokens=n_prompt,
        new_tokens=int(new.shape[0]),
        seconds=seconds,
        kv_bytes=cache_nbytes(cache),
        cache=cache,
        kv_tokens=seen,
        kv_full16_bytes=full16_nbytes(model, seen),
        kv_cold_bytes=tiers.get("cold", 0),
        kv_fetched_last_step=tiers.get("fetched", 0),
    )


def prefill(model: Any, tokenizer: Any, context: str, *, cache: Any = None, chat: bool | None = None) -> Any:
    """Feed ``context`` alone into ``cache`` (default: a fresh ``DynamicCache``) and return the cache: the tokens
    ``generate(..., prompt, context=context)`` feeds before its question (the chat template's head and the
    context), so a compressing cache compresses it question-agnostically. Then ask it several questions, each in
    a fork: ``generate(model, tokenizer, question, cache=cache.fork(), context=context, continue_cache=True)``
    gives what ``generate(model, tokenizer, question, cache=fresh, context=context)`` gives."""
    import torch
    from transformers import DynamicCache

    ids, split = encode_split(tokenizer, context, "?", chat)  # the question part is not fed
    if cache is not None:
        from .cache.guard import check_model

        check_model(cache, model)
        if int(cache.get_seq_length()):
            raise InvalidInput("prefill needs an empty cache: this one already holds tokens")
    check_context(split, model, what=f"the context ({split} tokens)")
    if cache is None:
        cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids[:, :split].to(model.device), cache=cache, use_cache=True, logits_to_keep=1)
    return cache
