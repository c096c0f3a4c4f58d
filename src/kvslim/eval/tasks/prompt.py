"""Token-exact prompt assembly: a haystack of exactly the right size with needles at exact token positions.

A prompt is built from token pieces, never by re-tokenising the whole string, so positions are exact:

    [frame prefix] [instruction] [segment 0] [needle 0] [segment 1] ... [needle k-1] [segment k] [question] [frame suffix] [primer]

* The frame is the chat template around one user turn when the tokenizer has one (SmolLM2), else just BOS (Gemma 3
  base). The primer ("The pass key is") opens the answer, so base and chat models both answer by continuation.
* ``length`` is the total prompt length in tokens. The haystack gets what the fixed parts leave: ``H`` tokens.
* Needle i is inserted after ``round(depth_i * H)`` haystack tokens, i.e. at prompt index
  ``haystack_start + round(depth_i * H) + sum(len(needle_j) for j < i)``. Depth 0 puts it first, depth 1 last.
* ``Prompt.question_start`` is the index of the first token of ``[question]``: everything before it is the context.
* Segment 0 ends on a sentence boundary and is cut at its start; later segments start on a sentence boundary and are
  cut at their end, so every needle follows a whole sentence or the instruction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ...errors import InvalidInput
from .haystack import encode, tokens_ending_at, tokens_starting_at

__all__ = ["Frame", "Prompt", "frame_for", "frame_pieces", "assemble", "ids_hash"]

_PLACEHOLDER = "\x00KVSLIM-CONTENT\x00"


@dataclass(frozen=True)
class Frame:
    """Token ids around the user content: ``prefix + content + suffix``; ``chat`` when a chat template made them."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    chat: bool


def frame_for(tokenizer: Any, chat: bool | None = None) -> Frame:
    """The chat template around one user turn (with the generation prompt), or BOS alone for a base model."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput("this tokenizer has no chat template: run without --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
        )
        head, sep, tail = text.partition(_PLACEHOLDER)
        if not sep:
            raise InvalidInput("the chat template dropped the user message; run with --no-chat")
        return Frame(tuple(encode(tokenizer, head)), tuple(encode(tokenizer, tail)), True)
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = encode(tokenizer, "a")
    bos = tuple(with_special[: len(with_special) - len(plain)]) if with_special[-len(plain) :] == plain else ()
    return Frame(bos, (), False)


def ids_hash(ids: list[int]) -> str:
    """A short stable hash of a token sequence (16 hex digits of sha256)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


@dataclass
class Prompt:
    """One built prompt: ``ids`` (``length`` token ids) and where each needle sits."""

    ids: list[int]
    needle_positions: list[int]  # prompt index of each needle's first token
    needle_ids: list[list[int]]
    haystack_start: int
    haystack_tokens: int  # H: haystack tokens, needles excluded
    answers: list[str]  # what a correct answer must contain (one per needle)
    answer_ids: list[int] = field(default_factory=list)  # teacher-forced target for the graded score
    max_new_tokens: int = 16
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return ids_hash(self.ids)

    @property
    def question_start(self) -> int:
        """Prompt index of the first token after the haystack and its needles (the question, then the frame suffix
        and the primer): ``ids[:question_start]`` is the context a question-agnostic cache compresses alone."""
        return self.haystack_start + self.haystack_tokens + sum(map(len, self.needle_ids))

    def __len__(self) -> int:
        return len(self.ids)


def frame_pieces(tokenizer: Any, instruction: str, question: str, primer: str, chat: bool | None = None
                 ) -> tuple[list[int], list[int]]:
    """``(head, tail)``: the ids before the haystack (frame prefix + instruction) and after it (question, frame
    suffix, primer)."""
    frame = frame_for(tokenizer, chat)
    head = list(frame.prefix) + encode(tokenizer, instruction)
    if frame.chat:
        tail = encode(tokenizer, "\n\n" + question) + list(frame.suffix) + encode(tokenizer, primer)
    else:
        tail = encode(tokenizer, "\n\n" + question + "\n") + encode(tokenizer, primer)
    return head, tail


def assemble(
    tokenizer: Any,
    *,
    length: int,
    depths: list[float],
    needles: list[str],
    sentences: list[str],
    anchor: int,
    instruction: str,
    question: str,
    primer: str,
    chat: bool | None = None,
) -> tuple[list[int], list[int], list[list[int]], int, int]:
    """Build the ids of a prompt of exactly ``length`` tokens.

    Args:
        depths: one depth in [0, 1] per needle, non-decreasing.
        needles: needle texts (each should start with a space).
        sentences: the haystack sentences; ``anchor`` is the index where the text around needle 0 is cut.
        instruction / question / primer: fixed texts; see the module docstring for the layout.

    Returns:
        ``(ids, needle_positions, needle_ids, haystack_start, haystack_tokens)``.
    """
    if len(depths) != len(needles):
        raise ValueError("one depth per needle")
    head, tail = frame_pieces(tokenizer, instruction, question, primer, chat)
    needle_ids = [encode(tokenizer, n) for n in needles]
    fixed = len(head) + len(tail) + sum(map(len, needle_ids))
    hay = length - fixed
    if hay < 8 * max(1, len(needles)):
        raise InvalidInput(
            f"length {length} is too short for this task: its fixed text alone takes {fixed} tokens; "
            f"use lengths of at least {fixed + 8 * max(1, len(needles))}"
        )
    cuts = [round(d * hay) for d in depths]
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, hay], strict=True)]
    segments = [tokens_ending_at(tokenizer, sentences, anchor, sizes[0])]
    cursor = anchor
    for size in sizes[1:]:
        seg, cursor = tokens_starting_at(tokenizer, sentences, cursor, size)
        segments.append(seg)
    ids = list(head)
    start = len(ids)
    positions = []
    for i, seg in enumerate(segments):
        ids += seg
        if i < len(needle_ids):
            positions.append(len(ids))
            ids += needle_ids[i]
    ids += tail
    if len(ids) != length:  # a bug, not bad input
        raise RuntimeError(f"built {len(ids)} tokens instead of {length}")
    return ids, positions, needle_ids, start, hay
