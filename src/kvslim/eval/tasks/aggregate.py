"""Prompts for the aggregation tasks (common / frequent words): a list of pieces filling the haystack exactly.

The haystack is a sequence of text pieces (``" 12. lambda"``, ``" xqzt"``), each tokenised on its own (every piece
starts with a space, so the ids join like running text), taken in order while they fit. The few tokens left over
(fewer than the longest piece) are newlines between the instruction and the list, so the prompt has exactly
``length`` tokens and every piece in it is whole:

    [frame prefix] [instruction] [newline padding] [piece 0] ... [piece m-1] [question] [frame suffix] [primer]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import InvalidInput
from .haystack import encode
from .prompt import frame_pieces

__all__ = ["fit_pieces", "ListPrompt"]


class ListPrompt:
    """The built ids, where the list starts, how many haystack tokens it took and how many pieces fitted."""

    def __init__(self, ids: list[int], start: int, haystack_tokens: int, used: int) -> None:
        self.ids, self.start, self.haystack_tokens, self.used = ids, start, haystack_tokens, used


def fit_pieces(
    tokenizer: Any,
    *,
    length: int,
    make_pieces: Callable[[int], list[str]],
    instruction: str,
    question: str,
    primer: str,
    chat: bool | None = None,
) -> ListPrompt:
    """Build a prompt of exactly ``length`` tokens from ``make_pieces(n)`` (a list of about ``n`` pieces).

    ``make_pieces`` is called with a growing estimate until its pieces overfill the haystack; the pieces that fit
    are used, in order (so the caller must count what it asked for from the ``used`` pieces only).
    """
    head, tail = frame_pieces(tokenizer, instruction, question, primer, chat)
    budget = length - len(head) - len(tail)
    if budget < 64:
        raise InvalidInput(f"length {length} is too short for this task: its fixed text alone takes "
                           f"{len(head) + len(tail)} tokens; use lengths of at least {len(head) + len(tail) + 64}")
    nl = encode(tokenizer, "\n")[:1]
    sample = make_pieces(max(64, budget // 2))  # only to measure tokens per piece
    per_piece = sum(len(encode(tokenizer, x)) for x in sample) / max(1, len(sample))
    n = int(budget / per_piece * 1.03) + 4  # a little more than fits: only a few pieces are cut off
    for _ in range(12):
        pieces = make_pieces(n)
        body: list[int] = []
        used = 0
        for piece in pieces:
            pid = encode(tokenizer, piece)
            if len(body) + len(pid) > budget:
                break
            body += pid
            used += 1
        if used < len(pieces):  # overfilled: the haystack is full up to less than one piece
            pad = nl * (budget - len(body))
            ids = head + pad + body + tail
            if len(ids) != length:  # a bug, not bad input
                raise RuntimeError(f"built {len(ids)} tokens instead of {length}")
            return ListPrompt(ids, len(head) + len(pad), len(body), used)
        n = int(n * 1.1) + 8
    raise RuntimeError("the pieces never filled the haystack")  # a bug: each round asks for 1.1x more
