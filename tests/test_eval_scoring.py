"""Scoring: teacher-forced log-probs, greedy decoding, answer matching, fidelity KL/perplexity, KV byte references."""

from __future__ import annotations

import pytest
import torch

from _eval_helpers import window_double
from kvslim.eval.harness.caches import cache_factory
from kvslim.eval.harness.engine import eos_ids, greedy, prefill, teacher_logprob
from kvslim.eval.harness.tiny import tiny_pair
from kvslim.eval.tasks.base import get_task, score_answer
from kvslim.hf_config import full16_nbytes
from kvslim.memory import cache_nbytes


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-llama")


def full(model):
    return cache_factory("full")(model)


def test_teacher_logprob_matches_one_full_forward(pair):
    model, tok = pair
    prompt = tok("The pass key is")["input_ids"]
    target = tok(" 12345", add_special_tokens=False)["input_ids"]
    pre = prefill(model, prompt, full(model))
    got = teacher_logprob(model, pre, target)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    want = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(target))
    assert got == pytest.approx(want, abs=1e-4)
    assert pre.cache.get_seq_length() == len(prompt)  # scoring ran on a copy: the cache is untouched


def test_greedy_matches_generate(pair):
    model, tok = pair
    prompt = tok("Hello there, how are")["input_ids"]
    out = greedy(model, prefill(model, prompt, full(model)), 12, eos_ids(tok, model))
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, cache=full(model))[0, len(prompt):].tolist()
    assert out == [t for t in ref if t != tok.eos_token_id][: len(out)] and len(out) >= 1


def test_prefill_measures_bytes_held(pair):
    model, tok = pair
    pre = prefill(model, list(range(50)), full(model))
    # tiny llama: 2 layers x (K + V) x 2 kv heads x 16 dims x 50 tokens x 4 bytes
    assert pre.kv_bytes == 2 * 2 * 2 * 16 * 50 * 4 == cache_nbytes(pre.cache)


@pytest.mark.parametrize("answer,expected,result", [
    ("The pass key is 12345.", ["12345"], (True, 1.0)),
    ("1234", ["12345"], (False, 0.0)),
    ("born in LISBON", ["Lisbon"], (True, 1.0)),
    ("11111, 22222", ["11111", "22222", "33333"], (False, 2 / 3)),
])
def test_score_answer(answer, expected, result):
    assert score_answer(answer, expected) == result


def test_retrieval_task_scores_a_cell(pair):
    model, tok = pair
    task = get_task("passkey")
    p = task.build(tok, 400, 0.5, 0)
    res = task.run(model, tok, p, lambda: full(model))
    assert set(res) >= {"success", "score", "answer", "kv_bytes", "logprob", "retrieved"}
    assert res["score"] < 0 and res["success"] is (p.answers[0] in res["answer"])


def test_fidelity_is_zero_for_full_and_positive_for_a_lossy_cache(pair):
    model, tok = pair
    task = get_task("fidelity", eval_tokens=16)
    p = task.build(tok, 300, 0.0, 0)
    ref = task.run(model, tok, p, lambda: full(model))
    assert ref["score"] == pytest.approx(0.0, abs=1e-6) and ref["ppl"] == pytest.approx(ref["ppl_full"])
    lossy = task.run(model, tok, p, lambda: window_double(32)(model))
    assert lossy["score"] > 1e-4 and lossy["kv_bytes"] < ref["kv_bytes"]
    assert lossy["ppl_full"] == pytest.approx(ref["ppl_full"])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("n", [5, 40])
def test_full16_reference_matches_a_measured_dynamic_cache(name, n):
    model, _ = tiny_pair(name)
    pre = prefill(model, list(range(n)), full(model))
    kv = sum(layer.keys.numel() + layer.values.numel() for layer in pre.cache.layers)  # K/V only, no side buffers
    assert full16_nbytes(model.config, n) == 2 * kv
    assert pre.kv_bytes - 4 * kv < 64  # cache_nbytes also counts stock sliding layers' 8-byte window scalar


def test_multi_needle_score_is_the_fraction_retrieved(pair):
    model, tok = pair
    task = get_task("multi-needle", k=2)
    p = task.build(tok, 600, 0.2, 0)
    res = task.run(model, tok, p, lambda: full(model))
    assert res["score"] == res["retrieved"] == score_answer(res["answer"], p.answers)[1]
    assert res["logprob"] < 0 and p.max_new_tokens == 24
