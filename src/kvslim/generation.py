"""Greedy generation with a measured KV cache.

``generate(model, tokenizer, prompt)`` formats the prompt (the chat template when the tokenizer has one), checks it
against the model's maximum context, runs ``model.generate`` greedily with an explicit cache object, and reports the
answer, the speed and the bytes the cache holds at the end (measured from its tensors).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ContextTooLong, InvalidInput
from .memory import cache_nbytes

__all__ = ["GenerateResult", "encode_prompt", "check_context", "generate"]


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


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    cache: Any = None,
    chat: bool | None = None,
) -> GenerateResult:
    """Greedy generation of at most ``max_new_tokens`` tokens after ``prompt``.

    ``cache`` is any transformers ``Cache`` (a kvslim compressed cache too); by default a fresh ``DynamicCache``.
    The cache is returned in the result so its bytes can be inspected further.
    """
    import torch
    from transformers import DynamicCache

    if max_new_tokens <= 0:
        raise InvalidInput(f"max_new_tokens must be positive, got {max_new_tokens}")
    ids = encode_prompt(tokenizer, prompt, chat)
    n_prompt = int(ids.shape[1])
    check_context(n_prompt + max_new_tokens, model, what=f"the prompt ({n_prompt} tokens) plus {max_new_tokens} new tokens")
    if cache is None:
        cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.inference_mode():
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
    new = out[0, n_prompt:]
    return GenerateResult(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        prompt_tokens=n_prompt,
        new_tokens=int(new.shape[0]),
        seconds=seconds,
        kv_bytes=cache_nbytes(cache),
        cache=cache,
        kv_tokens=seen,
        kv_full16_bytes=full16_nbytes(model, seen),
    )
