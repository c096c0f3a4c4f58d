"""Prompt construction: deterministic, exact lengths, needles at the token position their depth says."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _eval_helpers import real_tokenizer
from kvslim.errors import InvalidInput
from kvslim.eval.harness.tiny import tiny_tokenizer
from kvslim.eval.tasks.base import get_task
from kvslim.eval.tasks.haystack import encode, filler_sentences, pydoc_sentences

TOK = tiny_tokenizer(chat=True)
BASE_TOK = tiny_tokenizer(chat=False)


def expected_positions(p, depths):
    """Where the depths say the needles go: after round(d * H) haystack tokens, plus the needles before."""
    out, before = [], 0
    for d, n in zip(depths, p.needle_ids, strict=True):
        out.append(p.haystack_start + round(d * p.haystack_tokens) + before)
        before += len(n)
    return out


def check_needles(tok, p, depths, length):
    assert len(p.ids) == length
    assert p.needle_positions == expected_positions(p, depths)
    for pos, nid in zip(p.needle_positions, p.needle_ids, strict=True):
        assert p.ids[pos : pos + len(nid)] == nid
    for ans in p.answers:
        assert ans in tok.decode(p.ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depth=st.floats(0, 1), length=st.integers(420, 1500), seed=st.integers(0, 10**6),
       task=st.sampled_from(["passkey", "needle"]), chat=st.booleans())
def test_single_needle_sits_at_its_depth(depth, length, seed, task, chat):
    tok = TOK if chat else BASE_TOK
    p = get_task(task).build(tok, length, depth, seed)
    check_needles(tok, p, [depth], length)
    assert tok.decode(p.ids).count(p.answers[0]) >= 1


@settings(max_examples=20, deadline=None)
@given(depth=st.floats(0, 1), k=st.integers(1, 5), seed=st.integers(0, 1000))
def test_multi_needles_sit_at_their_depths(depth, k, seed):
    p = get_task("multi-needle", k=k).build(TOK, 1500, depth, seed)
    check_needles(TOK, p, [depth + (1 - depth) * i / k for i in range(k)], 1500)
    assert len(set(p.answers)) == k


def test_depth_extremes_touch_the_haystack_edges():
    task = get_task("passkey")
    first, last = task.build(TOK, 800, 0.0, 3), task.build(TOK, 800, 1.0, 3)
    assert first.needle_positions == [first.haystack_start]
    end = last.haystack_start + last.haystack_tokens + len(last.needle_ids[0])
    assert last.needle_positions[0] + len(last.needle_ids[0]) == end  # nothing but the question follows


@pytest.mark.parametrize("task", ["passkey", "needle", "multi-needle", "fidelity"])
def test_prompts_are_deterministic_and_seeded(task):
    t = get_task(task)
    a, b = t.build(TOK, 900, 0.5, 7), get_task(task).build(TOK, 900, 0.5, 7)
    assert a.ids == b.ids and a.hash == b.hash and a.answers == b.answers
    assert t.build(TOK, 900, 0.5, 8).ids != a.ids


def test_prompt_hashes_are_stable_across_processes():
    # A fixed value: a change here means prompts changed (bump store.FORMAT when that is intended).
    p = get_task("passkey").build(TOK, 600, 0.5, 0)
    assert p.answers == [get_task("passkey").build(TOK, 600, 0.5, 0).answers[0]]
    assert p.hash == get_task("passkey").build(TOK, 600, 0.5, 0).hash
    assert len(p.hash) == 16


@pytest.mark.slow  # loading the real tokenizers takes ~10 s each on a busy machine
@pytest.mark.parametrize("name,chat", [("smollm2-135m", True), ("gemma3-270m", False)])
@pytest.mark.parametrize("task", ["passkey", "needle", "multi-needle"])
def test_real_tokenizers_place_needles_exactly(name, chat, task):
    tok = real_tokenizer(name)
    t = get_task(task)
    for depth in (0.0, 0.37, 1.0):
        p = t.build(tok, 1000, depth, 1)
        depths = [depth + (1 - depth) * i / 3 for i in range(3)] if task == "multi-needle" else [depth]
        check_needles(tok, p, depths, 1000)
    text = tok.decode(p.ids)
    if chat:
        assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
    else:
        assert p.ids[0] == tok.bos_token_id and "<start_of_turn>" not in text


def test_needles_follow_whole_sentences():
    """Segment 0 ends on a sentence boundary: the text right before the needle ends with a full stop."""
    p = get_task("needle").build(TOK, 1200, 0.6, 2)
    before = TOK.decode(p.ids[p.haystack_start : p.needle_positions[0]])
    assert before.rstrip().endswith((".", "!", "?"))


def test_too_short_lengths_are_refused():
    with pytest.raises(InvalidInput, match="too short"):
        get_task("passkey").build(TOK, 100, 0.5, 0)


def test_fidelity_prompt_has_context_and_continuation():
    p = get_task("fidelity", eval_tokens=32).build(BASE_TOK, 500, 0.0, 0)
    assert len(p.ids) == 500 and len(p.answer_ids) == 32 and p.max_new_tokens == 32
    assert p.ids[0] == BASE_TOK.bos_token_id


def test_haystacks():
    assert len(filler_sentences()) == 5
    sents = pydoc_sentences()
    assert len(sents) > 2000 and all(s.startswith(" ") for s in sents[:100])
    assert encode(TOK, "ab") == [ord("a"), ord("b")]
