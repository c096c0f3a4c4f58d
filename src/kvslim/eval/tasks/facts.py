"""Random synthetic facts for needles: invented people, objects and numbers no model can know in advance.

Each fact is a needle sentence, a question, an answer primer (the answer's opening words, so base models answer by
continuation) and the answer string. Names are drawn from syllables, so they are not memorised entities.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Fact", "random_fact", "random_name", "CITIES"]

_ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "s", "l", "m", "th", "x"]
CITIES = [
    "Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Lima", "Oslo", "Hanoi", "Dublin", "Cairo",
    "Seville", "Manila", "Bogota", "Zurich", "Perth", "Tbilisi", "Quito", "Tallinn", "Porto", "Accra",
]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white"]
_OBJECTS = ["box", "lamp", "violin", "clock", "kettle", "bicycle", "umbrella", "mirror", "compass", "teapot"]


def random_name(rng: random.Random) -> str:
    """An invented two-part name such as ``Brailo Zenmath``."""

    def word(n: int) -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n)).capitalize()

    return f"{word(2)} {word(2)}"


@dataclass(frozen=True)
class Fact:
    needle: str  # with a leading space
    question: str
    primer: str
    answer: str


def random_fact(rng: random.Random) -> Fact:
    """One of three fact shapes (birthplace, secret code, hiding place), with random contents."""
    kind = rng.randrange(3)
    if kind == 0:
        name, city = random_name(rng), rng.choice(CITIES)
        return Fact(f" {name} was born in {city}.", f"Where was {name} born? Answer with the city only.", f"{name} was born in", city)
    thing = f"{rng.choice(_COLORS)} {rng.choice(_OBJECTS)}"
    if kind == 1:
        code = str(rng.randint(1000, 9999))
        return Fact(f" The secret code of the {thing} is {code}.", f"What is the secret code of the {thing}? Answer with the 4-digit number only.",
                    f"The secret code of the {thing} is", code)
    city = rng.choice(CITIES)
    return Fact(f" The {thing} is hidden in {city}.", f"Where is the {thing} hidden? Answer with the city only.", f"The {thing} is hidden in", city)
