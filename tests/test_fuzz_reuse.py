"""Issue 25 part 4: a fuzz pass (hypothesis, derandomized) over the reuse tasks (multi-turn, multi-request, long-list,
long-copy): their options, the prompt lengths, depths and seeds, and their scoring.

* Options go through the grid's own check (``check_options`` then ``get_task``, what ``Grid.validate`` runs): any
  value (small, boundaries, huge, negative, None, floats, strings, booleans) is refused in one ``InvalidInput`` line
  or gives a task whose options are in range.
* Prompts: for any length, depth in [0, 1], seed (int64) and option set, ``build`` either refuses in one line with a
  length that does fit, or gives exactly ``length`` tokens, the same ones for the same seed, needle 0 at the stated
  depth, every needle's tokens where the prompt says, every value exactly once in the context and never in the
  question, one turn per needle.
* Scoring: any answer (empty, garbage, unicode, the passage itself) scores in [0, 1]; partial credit only grows when
  an answer gets longer or a turn gets answered; the expected answer scores 1.
* Grids (lengths, depths, seed, options) either fit the tiny model's context with every answer token of the cell or
  are refused in one line.
* A few cells on the tiny model (full and recall) with random option sets: bounded scores, one turn per needle.

What the pass found (each has a test at the bottom): the length a refusal named ("use lengths of at least N") was
measured on the values drawn for the refused length, so N itself could be refused again; an option set to None
(``Grid(options={"k": None})``, the Python API) skipped the range check and ended in a TypeError.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvslim.errors import InvalidInput, KvslimError
from kvslim.eval.harness.engine import score_answer
from kvslim.eval.harness.runner import build_prompt, check_options
from kvslim.eval.harness.tiny import tiny_pair, tiny_tokenizer
from kvslim.eval.tasks.base import get_task
from kvslim.eval.tasks.long_copy import copy_score, passage, score_copy, words_of
from kvslim.eval.tasks.long_list import score_list
from kvslim.eval.tasks.reuse import MAX_TURNS, _cell

REUSE = ["multi-turn", "multi-request", "long-list", "long-copy"]
SETTINGS = {"deadline": timedelta(seconds=20), "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}  # fmt: skip
INTS = st.one_of(st.integers(-3, 20), st.sampled_from([0, 1, 7, 8, 16, 17, 999, 1000, 1001, 2**31, 2**63 - 1, 2**63,
                                                      -(2**63), 10**30]))  # fmt: skip
ANY = st.one_of(INTS, st.none(), st.booleans(), st.sampled_from([2.0, 0.5, float("nan"), "3", "", [], {}]))
NEEDS_AT_LEAST = re.compile(r"use lengths of at least (\d+)")
TOKENIZERS = {True: tiny_tokenizer(chat=True), False: tiny_tokenizer(chat=False)}


def _one_line(e: Exception) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


def _task(name: str, options: dict):
    """The grid's option path: range check, then the task (refusals are one line)."""
    check_options(name, options)
    return get_task(name, **options)


# ---- options -----------------------------------------------------------------------------------------------------
@settings(max_examples=200, **SETTINGS)
@given(name=st.sampled_from(REUSE), options=st.dictionaries(
    st.sampled_from(["k", "words", "max_new_tokens", "chat", "agnostic", "depth"]), ANY, max_size=3))
def test_fuzz_options_are_in_range_or_refused_in_one_line(name, options):
    try:
        task = _task(name, options)
    except KvslimError as e:
        _one_line(e)
        return
    if hasattr(task, "k"):
        assert isinstance(task.k, int) and not isinstance(task.k, bool) and 1 <= task.k <= MAX_TURNS
    if hasattr(task, "words"):
        assert isinstance(task.words, int) and 8 <= task.words <= 1000
    assert isinstance(task.max_new_tokens, int) and task.max_new_tokens >= 0
    assert task.chat in (None, True, False) and task.agnostic in (True, False)


# ---- prompts -----------------------------------------------------------------------------------------------------
DEPTHS = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-9, 1 - 1e-9]), st.floats(0.0, 1.0))
SEEDS = st.one_of(st.integers(0, 5), st.integers(-(2**63), 2**63 - 1))


@st.composite
def builds(draw: st.DrawFn) -> tuple[str, dict, int, float, int, bool]:
    name = draw(st.sampled_from(REUSE))
    opts = {"max_new_tokens": draw(st.sampled_from([0, 0, 1, 5, 300]))}
    if name == "long-copy":
        opts["words"] = draw(st.one_of(st.integers(8, 40), st.sampled_from([8, 100, 1000])))
    else:
        opts["k"] = draw(st.one_of(st.integers(1, 4), st.sampled_from([1, 8, 16])))
    length = draw(st.one_of(st.integers(1, 2500), st.sampled_from([1, 64, 600, 1500, 8200])))
    return name, opts, length, draw(DEPTHS), draw(SEEDS), draw(st.booleans())


def _check_prompt(name: str, task, p, tok, length: int, depth: float) -> None:
    assert len(p) == length and len(p.ids) == length
    assert all(isinstance(i, int) and 0 <= i < len(tok) for i in p.ids)
    t = p.meta.get("target", 0)
    assert p.needle_positions[t] == p.haystack_start + round(depth * p.haystack_tokens) + sum(map(len, p.needle_ids[:t]))
    for pos, nids in zip(p.needle_positions, p.needle_ids, strict=True):  # every needle where the prompt says
        assert p.ids[pos : pos + len(nids)] == nids
    assert p.needle_positions == sorted(p.needle_positions) and p.question_start <= length
    context, question = tok.decode(p.ids[: p.question_start]), tok.decode(p.ids[p.question_start :])
    for a in p.answers:
        assert context.count(a) == 1 and a not in question, a
    assert p.max_new_tokens >= 1 and p.answer_ids
    if name == "long-copy":
        assert len(words_of(p.meta["passage"])) == task.words
        return
    assert p.meta["depths"] == sorted(p.meta["depths"]) and p.meta["depths"][t] == depth
    assert len(p.answers) == len(set(p.answers)) == task.k and len(set(p.meta["keys"])) == task.k
    if name.startswith("multi"):
        turns = p.meta["turns"]
        assert len(turns) == task.k and turns[0].ids == p.ids[p.question_start :]
        assert [x.answers[0] for x in turns] == p.answers
        assert all(x.max_new_tokens == (task.max_new_tokens or 16) for x in turns)
        assert p.max_new_tokens >= sum(x.max_new_tokens for x in turns) if name == "multi-turn" else True


@settings(max_examples=120, **SETTINGS)
@given(case=builds())
def test_fuzz_prompts_fit_exactly_or_name_a_length_that_fits(case):
    name, opts, length, depth, seed, chat = case
    tok = TOKENIZERS[chat]
    task = _task(name, {**opts, "chat": chat})
    try:
        p = build_prompt(task, tok, length, depth, seed)  # what the grid builds with
    except InvalidInput as e:
        _one_line(e)
        need = int(NEEDS_AT_LEAST.search(str(e)).group(1))
        assert need > length
        p, length = task.build(tok, need, depth, seed), need  # the length the refusal names fits
    _check_prompt(name, task, p, tok, length, depth)
    assert task.build(tok, length, depth, seed).ids == p.ids  # deterministic per seed


@settings(max_examples=40, **SETTINGS)
@given(name=st.sampled_from(REUSE), k=st.integers(1, 16), budget=st.sampled_from([0, 1, 16, 500, 4000, 2**62]),
       lengths=st.lists(st.integers(1, 4200), min_size=1, max_size=2), depths=st.lists(DEPTHS, min_size=1, max_size=2),
       seed=SEEDS)  # fmt: skip
def test_fuzz_grids_fit_the_context_or_are_refused_in_one_line(name, k, budget, lengths, depths, seed):
    """A grid's prompts (tiny-llama: 4096 tokens) all fit the model's context with their whole answer budget (every
    later turn and answer of a multi-turn cell included), or the grid is refused in one line."""
    from kvslim.eval.harness.runner import Grid, build_prompts

    opts = {"max_new_tokens": budget, **({"words": 8 + k} if name == "long-copy" else {"k": k})}
    try:
        grid = Grid(task=name, model="tiny-llama", recipes=["full"], lengths=lengths, depths=depths, seeds=[seed],
                    options=opts).validate()  # fmt: skip
        prompts = build_prompts(grid, TOKENIZERS[True], 4096)
    except KvslimError as e:
        _one_line(e)
        return
    for p in prompts.values():
        assert len(p) + p.max_new_tokens <= 4096


# ---- scoring -----------------------------------------------------------------------------------------------------
GARBAGE = st.one_of(st.text(max_size=200), st.sampled_from(["", " ", "\x00", "|", "\n" * 5, "é ß İ ﬁ", "1234567"]))


@settings(max_examples=300, **SETTINGS)
@given(seed=st.integers(0, 2**32), n=st.integers(8, 60), answer=GARBAGE, more=GARBAGE, cut=st.integers(0, 80))
def test_fuzz_copy_score_is_bounded_and_monotone(seed, n, answer, more, cut):
    import random

    text = passage(random.Random(seed), n)
    assert len(words_of(text)) == n
    s = copy_score(answer, text)
    assert 0.0 <= s <= 1.0
    assert copy_score(answer + " " + more, text) >= s  # more words never lose credit
    assert copy_score(more + " " + answer, text) >= s
    words = text.split()
    assert copy_score(" ".join(words[: cut + 1]), text) >= copy_score(" ".join(words[:cut]), text)  # prefixes
    assert copy_score(text, text) == 1.0 and copy_score(text.upper(), text) == 1.0
    res = score_copy({"answer": answer, "success": True, "retrieved": 9.0, "score": -5.0}, _P(text, []))
    assert 0.0 <= res["score"] == res["retrieved"] <= 1.0 and res["success"] is (res["score"] == 1.0)


class _P:
    def __init__(self, text: str, keys: list[str]) -> None:
        self.meta = {"passage": text, "keys": keys}


@settings(max_examples=200, **SETTINGS)
@given(expected=st.lists(st.from_regex(r"[0-9]{7}", fullmatch=True), min_size=1, max_size=16, unique=True),
       keys=st.lists(st.from_regex(r"[a-z]+-[a-z]+", fullmatch=True), min_size=1, max_size=16),
       answer=GARBAGE, more=GARBAGE)  # fmt: skip
def test_fuzz_list_and_turn_scores_are_bounded_and_monotone(expected, keys, answer, more):
    ok, frac = score_answer(answer, expected)
    assert 0.0 <= frac <= 1.0 and ok is (frac == 1.0)
    assert score_answer(answer + more, expected)[1] >= frac
    assert score_answer("\n".join(expected), expected) == (True, 1.0)
    res = score_list({"answer": answer, "retrieved": frac, "success": ok, "score": -9.0}, _P("", keys))
    assert res["score"] == frac and 0.0 <= res["keys_found"] <= 1.0


class _Pre:
    def tier_fields(self) -> dict:
        return {}


@settings(max_examples=200, **SETTINGS)
@given(flags=st.lists(st.tuples(st.booleans(), st.floats(0, 1), st.floats(-1e4, 0)), min_size=1, max_size=MAX_TURNS),
       flip=st.integers(0, MAX_TURNS - 1))  # fmt: skip
def test_fuzz_cell_scores_are_bounded_and_monotone_in_turns(flags, flip):
    turns = [{"success": s, "retrieved": 1.0 if s else r, "logprob": lp, "answer": "x"} for s, r, lp in flags]
    cell = _cell(turns, 0, _Pre())
    assert 0.0 <= cell["score"] <= 1.0 and 0.0 <= cell["retrieved"] <= 1.0
    assert cell["success"] is (cell["score"] == 1.0)
    i = flip % len(turns)
    better = [dict(t) for t in turns]
    better[i].update(success=True, retrieved=1.0)
    assert _cell(better, 0, _Pre())["score"] >= cell["score"]


# ---- cells on the tiny model ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-llama")


def test_fuzz_cells_on_the_tiny_model(pair):
    from transformers import DynamicCache

    from kvslim.cache import make_cache

    model, tok = pair
    recipes = {"full": lambda: DynamicCache(config=model.config),
               "recall": lambda: make_cache(model, "recall:m=4,k=2,w=16,sinks=2")}  # fmt: skip

    @settings(max_examples=6, **SETTINGS)
    @given(name=st.sampled_from(["multi-turn", "multi-request"]), k=st.integers(1, 3), budget=st.integers(1, 3),
           agnostic=st.booleans(), recipe=st.sampled_from(sorted(recipes)), depth=DEPTHS, seed=st.integers(0, 9))
    def run(name, k, budget, agnostic, recipe, depth, seed):
        task = _task(name, {"k": k, "max_new_tokens": budget, "agnostic": agnostic})
        p = task.build(tok, 700, depth, seed)
        res = task.run(model, tok, p, recipes[recipe])
        assert len(res["turns"]) == k and 0.0 <= res["score"] <= 1.0 and 0.0 <= res["retrieved"] <= 1.0
        assert all(t["new_tokens"] <= budget and isinstance(t["answer"], str) for t in res["turns"])
        assert res["score"] == sum(t["success"] for t in res["turns"]) / k and res["kv_bytes"] > 0

    run()


# ---- what the pass found -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", REUSE)
def test_the_length_a_refusal_names_fits(name):
    """The refusal measured the fixed text on the values drawn for the refused length; at the length it named, other
    values (longer words, a longer passage) could be drawn and the prompt was refused again."""
    tok = TOKENIZERS[True]
    task = get_task(name, **({"words": 1000} if name == "long-copy" else {"k": 16}))
    for length in (1, 100, 800):
        for seed in range(3):
            with pytest.raises(InvalidInput, match="use lengths of at least") as exc:
                build_prompt(task, tok, length, 0.5, seed)
            need = int(NEEDS_AT_LEAST.search(str(exc.value)).group(1))
            assert len(task.build(tok, need, 0.5, seed)) == need


@pytest.mark.parametrize("name, option", [("multi-turn", "k"), ("long-list", "k"), ("long-copy", "words"),
                                          ("multi-request", "max_new_tokens")])  # fmt: skip
def test_an_option_set_to_none_is_refused_in_one_line(name, option):
    """``Grid(options={"k": None})`` skipped the range check (None meant "not given") and ``k=None`` reached the
    task: TypeError "'<=' not supported between instances of 'int' and 'NoneType'"."""
    with pytest.raises(InvalidInput, match="must be a whole number, got None"):
        check_options(name, {option: None})
