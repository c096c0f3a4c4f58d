"""RULER's variable tracking (VT, multi-hop tracing; Hsieh et al. 2024, section 3.2).

A chain of assignments ``VAR QPWUE = 48213.``, ``VAR MMNRE = VAR QPWUE.``, ... (``hops`` hops, so ``hops + 1``
names) is spread through the repeated passkey filler in chain order; ``depth`` places the first assignment, the
others follow at random depths after it. ``chains - 1`` distractor chains with other values are spread the same way.
The question asks for every name bound to the first chain's value; ``retrieved`` (and ``score``) is the fraction of
those names in the answer, ``success`` needs all. With ``example`` a short solved example (its own names and value)
opens the prompt, as in RULER's template.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidInput
from .base import RecallTask, task_rng
from .haystack import encode, filler_sentences
from .needles import count_in, haystack_text, needle_depths
from .prompt import Prompt, assemble
from .values import letters

__all__ = ["VariableTracking"]

INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
PRIMER = "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned " \
         "the value {value}, they are:"


def _chain(rng: random.Random, value: str, hops: int, taken: set[str]) -> list[tuple[str, str]]:
    """``hops + 1`` (name, right-hand side) pairs: the first binds ``value``, each next one the previous name."""
    names: list[str] = []
    while len(names) < hops + 1:
        n = letters(rng, 5)
        if n not in taken:
            taken.add(n)
            names.append(n)
    return [(names[0], value)] + [(names[i], f"VAR {names[i - 1]}") for i in range(1, hops + 1)]


@dataclass
class VariableTracking(RecallTask):
    """Options: ``hops`` (assignments after the first), ``chains`` (1 + distractor chains), ``example``,
    ``max_new_tokens`` (0: 6 per name + 8), ``chat``."""

    hops: int = 4
    chains: int = 1
    example: bool = True
    max_new_tokens: int = 0
    chat: bool | None = None

    name = "vt"

    def __post_init__(self) -> None:
        if not (1 <= self.hops <= 16 and 1 <= self.chains <= 8):
            raise InvalidInput(f"vt needs 1 <= hops <= 16 and 1 <= chains <= 8, got hops={self.hops} chains={self.chains}")

    def build(self, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
        rng = task_rng(self.name, seed, length, depth)
        taken: set[str] = set()
        values = [str(v) for v in rng.sample(range(10000, 100000), self.chains + 1)]
        chains = [_chain(rng, values[c], self.hops, taken) for c in range(self.chains)]
        # every chain in order; chain 0 starts at ``depth``, the others anywhere
        placed: list[tuple[float, int, int]] = []
        for c in range(self.chains):
            start = depth if c == 0 else rng.uniform(0.0, 1.0)
            ds, _ = needle_depths(rng, start, self.hops + 1, ordered=True)
            placed += [(d, c, h) for h, d in enumerate(ds)]
        placed.sort()
        needles = [f" VAR {chains[c][h][0]} = {chains[c][h][1]}." for _, c, h in placed]
        instruction = INSTRUCTION
        if self.example:
            ex = _chain(rng, values[-1], 2, taken)
            body = " ".join(f"VAR {n} = {v}. The grass is green." for n, v in ex)
            answer = " ".join(n for n, _ in ex)
            instruction += (f"Example: {body}\n{QUESTION.format(value=values[-1])} "
                            f"{PRIMER.format(n=len(ex), value=values[-1])} {answer}\n\nNow the text.\n\n")
        sentences = filler_sentences()
        names = [n for n, _ in chains[0]]
        ids, pos, nids, start_, hay = assemble(
            tokenizer, length=length, depths=[d for d, _, _ in placed], needles=needles, sentences=sentences,
            anchor=rng.randrange(len(sentences)), instruction=instruction, question=QUESTION.format(value=values[0]),
            primer=PRIMER.format(n=len(names), value=values[0]), chat=self.chat,
        )
        p = Prompt(ids, pos, nids, start_, hay, answers=names, answer_ids=encode(tokenizer, " " + " ".join(names)),
                   max_new_tokens=self.max_new_tokens or 6 * len(names) + 8,
                   meta={"value": values[0], "depths": [d for d, _, _ in placed],
                         "target": [(c, h) for _, c, h in placed].index((0, 0))})
        if count_in(haystack_text(tokenizer, p), f"= {values[0]}.") != 1:  # a bug, not bad input
            raise RuntimeError("the asked value is not bound exactly once")
        return p
