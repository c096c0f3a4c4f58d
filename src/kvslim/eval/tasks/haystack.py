"""Haystack text: the repeated passkey filler and natural prose from ``pydoc_data.topics``.

A haystack is a list of sentences, each starting with a space so that sentences tokenised apart join like running
text. ``tokens_ending_at`` / ``tokens_starting_at`` turn a sentence list into exactly ``n`` token ids whose inner edge
lies on a sentence boundary (the needle is placed there), cutting only at the outer edge.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = [
    "FILLER",
    "filler_sentences",
    "pydoc_sentences",
    "tokens_ending_at",
    "tokens_starting_at",
    "encode",
]

# The classic passkey filler (Mohtashami & Jaggi 2023, "Landmark Attention", appendix: passkey retrieval).
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_RULE = re.compile(r"^\s*[*=\-~^]{3,}\s*$")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS/EOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def filler_sentences() -> list[str]:
    """The passkey filler as its five sentences (each with a leading space)."""
    return [" " + s.strip() for s in _SENTENCE_END.split(FILLER.strip())]


@functools.lru_cache(maxsize=1)
def _pydoc_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):  # sorted: the same order on every Python build
        lines = [ln for ln in topics[key].splitlines() if not _RULE.match(ln)]
        text = " ".join(" ".join(lines).split())  # prose-like: collapse all whitespace runs
        out.extend(" " + s for s in _SENTENCE_END.split(text) if len(s) > 1)
    return tuple(out)


def pydoc_sentences() -> list[str]:
    """Sentences of Python's own reference documentation (``pydoc_data.topics``, ~460k characters), in a fixed order."""
    return list(_pydoc_sentences())


def _take(tokenizer: Any, sentences: list[str], start: int, n: int, step: int) -> tuple[list[int], int]:
    """Ids of consecutive sentences from index ``start`` walking by ``step`` (+1/-1, wrapping) until >= n tokens,
    and the index after the last sentence used."""
    if n <= 0:
        return [], start
    pieces: list[str] = []
    count, i = 0, start
    while count < n:
        s = sentences[i % len(sentences)]
        pieces.append(s)
        count += len(encode(tokenizer, s))
        i += step
    if step < 0:
        pieces.reverse()
    # Tokenise the run as one text (natural merges); sentence-by-sentence counts only bound its length.
    ids = encode(tokenizer, "".join(pieces))
    while len(ids) < n:  # merges across sentences can shorten the run a little: extend and retry
        s = sentences[i % len(sentences)]
        pieces = [*pieces, s] if step > 0 else [s, *pieces]
        ids = encode(tokenizer, "".join(pieces))
        i += step
    return ids, i


def tokens_ending_at(tokenizer: Any, sentences: list[str], end: int, n: int) -> list[int]:
    """Exactly ``n`` ids of the text that ends just before sentence ``end`` (cut at its start if needed)."""
    ids, _ = _take(tokenizer, sentences, end - 1, n, -1)
    return ids[len(ids) - n :] if n > 0 else []


def tokens_starting_at(tokenizer: Any, sentences: list[str], start: int, n: int) -> tuple[list[int], int]:
    """Exactly ``n`` ids of the text that starts at sentence ``start`` (cut at its end if needed), and the index of
    the first sentence not used (where the next segment should start)."""
    ids, nxt = _take(tokenizer, sentences, start, n, +1)
    return ids[:n], nxt
