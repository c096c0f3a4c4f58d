"""The RULER-style generators: exact lengths, needles where their depths say, answers exactly once, determinism
across processes, the aggregation counts, and the scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _eval_helpers import real_tokenizer
from kvslim.errors import InvalidInput
from kvslim.eval.harness.suite import SUITES
from kvslim.eval.harness.tiny import tiny_pair, tiny_tokenizer
from kvslim.eval.tasks.base import get_task, score_answer
from kvslim.eval.tasks.needles import count_in, haystack_text, needle_depths
from kvslim.eval.tasks.values import draw

TOK = tiny_tokenizer(chat=True)
BASE_TOK = tiny_tokenizer(chat=False)
SUITE = list(SUITES["ruler"])
NEEDLE_TASKS = [t for t in [*SUITE, "distractor"] if get_task(t).uses_depth]
KEYED = [t for t in NEEDLE_TASKS if t.startswith("niah") or t == "distractor"]


def check_positions(p):
    """Needle j sits after round(depth_j * H) haystack tokens plus the needles before it, token for token."""
    before = 0
    for d, pos, nid in zip(p.meta["depths"], p.needle_positions, p.needle_ids, strict=True):
        assert pos == p.haystack_start + round(d * p.haystack_tokens) + before
        assert p.ids[pos : pos + len(nid)] == nid
        before += len(nid)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=st.sampled_from(NEEDLE_TASKS), depth=st.floats(0, 1), length=st.integers(1500, 2600),
       seed=st.integers(0, 10**6), chat=st.booleans())
def test_needles_sit_at_their_depths_and_answers_occur_once(task, depth, length, seed, chat):
    tok = TOK if chat else BASE_TOK
    p = get_task(task).build(tok, length, depth, seed)
    assert len(p.ids) == length
    check_positions(p)
    target = p.meta["target"]
    assert p.meta["depths"][target] == depth  # the needle the grid's depth names is where it says
    text = haystack_text(tok, p)
    if task in KEYED:
        for v in p.answers:
            assert count_in(text, v) == 1
        needles = p.meta["needles"]
        assert p.answers[0] in needles[target]
    else:  # vt: the value is bound once, every name of the chain is defined once
        assert count_in(text, f"= {p.meta['value']}.") == 1
        for name in p.answers:
            assert count_in(text, f"VAR {name} =") == 1


def test_needle_depths_helper():
    import random

    depths, order = needle_depths(random.Random(0), 0.4, 5)
    assert depths == sorted(depths) and sorted(order) == list(range(5)) and depths[order.index(0)] == 0.4
    chain, order = needle_depths(random.Random(0), 0.7, 4, ordered=True)
    assert order == [0, 1, 2, 3] and chain[0] == 0.7 and chain == sorted(chain) and min(chain) >= 0.7
    tie, order = needle_depths(random.Random(0), 1.0, 3, ordered=True)  # all at 1.0: needle 0 first
    assert tie == [1.0, 1.0, 1.0] and order[0] == 0


def test_task_variants_differ_as_ruler_configures_them():
    p1 = get_task("niah_single_1").build(TOK, 1500, 0.5, 0)
    assert "The grass is green." in TOK.decode(p1.ids)
    p3 = get_task("niah_single_3").build(TOK, 1500, 0.5, 0)
    assert len(p3.answers[0]) == 36 and p3.answers[0].count("-") == 4
    mk2 = get_task("niah_multikey_2").build(TOK, 1500, 0.5, 0)
    hay = haystack_text(TOK, mk2)
    assert hay.count("One of the special magic numbers for") > 10 and "grass" not in hay  # only needles
    mk1 = get_task("niah_multikey_1").build(TOK, 1500, 0.5, 0)
    assert len(mk1.needle_ids) == 4 and len(mk1.answers) == 1
    mv = get_task("niah_multivalue").build(TOK, 1500, 0.5, 0)
    assert len(mv.answers) == 4 and len({n.split(" is:")[0] for n in mv.meta["needles"]}) == 1  # one key
    mq = get_task("niah_multiquery").build(TOK, 1500, 0.5, 0)
    assert len(mq.answers) == 4 and len(mq.meta["keys"]) == 4
    d = get_task("distractor").build(TOK, 1500, 0.5, 0)
    assert all(n.startswith("The access code for ") for n in d.meta["needles"]) and len(d.needle_ids) == 4
    assert f"What is the access code for {d.meta['keys'][0]}?" in TOK.decode(d.ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length", [2000, 4000])
def test_common_words_counts(seed, length):
    p = get_task("cwe").build(TOK, length, 0.0, seed)
    assert len(p.ids) == length and p.needle_positions == []
    body = TOK.decode(p.ids[p.haystack_start : p.haystack_start + p.haystack_tokens])
    words = Counter(w for i, w in enumerate(body.split()) if i % 2 == 1)  # " 1. word 2. word ..."
    assert sum(words.values()) == p.meta["entries"]
    top = sorted(words.values(), reverse=True)
    assert {words[a] for a in p.answers} <= set(top[:10]) and min(words[a] for a in p.answers) > top[10]
    assert words.most_common(1)[0][1] <= 30
    others = [w for w in words if w not in p.answers]
    assert not any(a in w or w in a for a in p.answers for w in others)  # string match cannot confuse them


def test_common_words_long_prompts_repeat_uncommon_words_instead_of_running_out():
    import random

    task = get_task("cwe")
    common = [f"c{i}" for i in range(10)]
    others = [f"w{i}" for i in range(300)]
    short = Counter(task._entries(random.Random(0), common, others, 300 + 750))  # fits: RULER's 30 / 3
    assert {short[c] for c in common} == {30} and max(v for w, v in short.items() if w not in common) == 3
    long = Counter(task._entries(random.Random(0), common, others, 300 + 3000))  # 3000 uncommon entries, 300 words
    worst = max(v for w, v in long.items() if w not in common)
    assert {long[c] for c in common} == {30} and worst == 11 and len(long) - 10 <= 300
    with pytest.raises(InvalidInput, match="more than half of the common"):
        task._entries(random.Random(0), common, others, 300 + 300 * 16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frequent_words_counts(seed):
    p = get_task("fwe").build(TOK, 2000, 0.0, seed)
    assert len(p.ids) == 2000
    body = TOK.decode(p.ids[p.haystack_start : p.haystack_start + p.haystack_tokens]).split()
    ranked = Counter(body).most_common()
    assert [w for w, _ in ranked[:3]] == p.answers and ranked[2][1] > ranked[3][1]
    assert ranked[0][1] > 2 * ranked[1][1]  # Zipf, alpha 2: rank 1 is 4x rank 2 in expectation


def test_values_are_distinct_and_never_inside_one_another():
    import random

    for kind in ("numbers", "words", "uuids", "coded"):
        vals = draw(random.Random(3), kind, 300)
        assert len(set(vals)) == 300
        assert not any(a != b and a in b for a in vals for b in vals)
    with pytest.raises(InvalidInput, match="city"):
        draw(random.Random(0), "cities", 21)


_CHILD = """
import json, sys
from kvslim.eval.tasks.base import get_task
from kvslim.eval.harness.suite import SUITES
from kvslim.eval.harness.tiny import tiny_tokenizer
tok = tiny_tokenizer(chat=True)
print(json.dumps({t: get_task(t).build(tok, 1500, 0.3, 5).ids for t in [*SUITES["ruler"], "distractor"]}))
"""


def test_generators_are_deterministic_across_processes():
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": "123"}  # a different hash seed than this process
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=True)
    theirs = json.loads(out.stdout)
    for task in [*SUITE, "distractor"]:
        assert theirs[task] == get_task(task).build(TOK, 1500, 0.3, 5).ids, task
        assert get_task(task).build(TOK, 1500, 0.3, 6).ids != theirs[task]


@pytest.mark.parametrize("answer,expected,result", [  # RULER's string_match_all on fixtures
    ("The special magic number is 4821907.", ["4821907"], (True, 1.0)),
    ("4821907, 1234567 and 7654321", ["4821907", "7654321", "1111111", "2222222"], (False, 0.5)),
    ("they are: QPWUE MMNRE", ["QPWUE", "MMNRE", "ZZZZZ"], (False, 2 / 3)),
    ("Lambda, FORMAT", ["lambda", "format"], (True, 1.0)),
    ("nothing", ["08a7620a-d791-f42f-448c-ebae94000e2d"], (False, 0.0)),
])
def test_recall_scoring(answer, expected, result):
    assert score_answer(answer, expected) == result


@pytest.mark.parametrize("task", ["niah_multivalue", "vt", "cwe"])
def test_a_cell_scores_recall_beside_success_and_logprob(task):
    from kvslim.eval.harness.caches import cache_factory

    model, tok = tiny_pair("tiny-llama")
    t = get_task(task)
    p = t.build(tok, 1500, 0.5, 0)
    res = t.run(model, tok, p, lambda: cache_factory("full")(model))
    assert res["score"] == res["retrieved"] == score_answer(res["answer"], p.answers)[1]
    assert res["success"] is (res["retrieved"] == 1.0) and res["logprob"] < 0


@pytest.mark.parametrize("task,options,match", [
    ("niah_single_1", {"haystack": "sand"}, "unknown haystack"),
    ("niah_single_1", {"values": "colours"}, "unknown values kind"),
    ("niah_multikey_1", {"n_queries": 5}, "n_queries"),
    ("niah_multikey_2", {"keys": "cities"}, "cities"),
    ("vt", {"hops": 0}, "hops"),
    ("cwe", {"freq_common": 4}, "freq_uncommon"),
    ("fwe", {"alpha": 0.5}, "alpha"),
])
def test_bad_options_are_refused(task, options, match):
    with pytest.raises(InvalidInput, match=match):
        get_task(task, **options)


def test_too_short_lengths_are_refused():
    with pytest.raises(InvalidInput, match="too short"):
        get_task("niah_multivalue").build(TOK, 300, 0.5, 0)
    with pytest.raises(InvalidInput, match="longer length|too short"):
        get_task("cwe").build(TOK, 1000, 0.0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_tokenizers(name):
    tok = real_tokenizer(name)
    for task in [*SUITE, "distractor"]:
        for depth in (0.0, 0.6, 1.0):
            p = get_task(task).build(tok, 2000, depth, 1)
            assert len(p.ids) == 2000
            if p.needle_positions:
                check_positions(p)
            text = haystack_text(tok, p)
            if task in KEYED:
                assert all(count_in(text, v) == 1 for v in p.answers)


@pytest.mark.parametrize("haystack", ["noise", "essay", "needles"])
@pytest.mark.parametrize("values", ["numbers", "words", "uuids"])
def test_single_needle_haystack_and_value_kinds(haystack, values):
    t = get_task("niah_single_1", haystack=haystack, values=values)
    p = t.build(TOK, 2000, 0.35, 4)
    assert len(p.ids) == 2000
    check_positions(p)
    text = haystack_text(TOK, p)
    assert count_in(text, p.answers[0]) == 1 and count_in(text, p.meta["keys"][0]) == 1
    if values == "words":
        assert p.answers[0].count("-") == 1
