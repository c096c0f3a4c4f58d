"""Question-agnostic vs question-aware prefill: where the question starts, and the two-call prefill paths."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvslim.eval.harness.engine import prefill
from kvslim.eval.harness.tiny import tiny_pair, tiny_tokenizer
from kvslim.eval.tasks.base import get_task
from kvslim.generation import encode_split, generate


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("task", ["passkey", "needle", "multi-needle"])
def test_question_start_is_the_first_token_after_the_haystack(task, chat):
    tok = tiny_tokenizer(chat=chat)
    for depth in (0.0, 0.5, 1.0):
        p = get_task(task).build(tok, 600, depth, 3)
        qs = p.question_start
        last = p.needle_positions[-1] + len(p.needle_ids[-1])
        assert last <= qs < len(p.ids)
        assert qs == p.haystack_start + p.haystack_tokens + sum(map(len, p.needle_ids))
        assert tok.decode(p.ids[qs:]).lstrip().startswith(("What", "Which", "Who", "How", "Where", "When", "List"))
        assert p.answers[0] not in tok.decode(p.ids[qs:])  # the answer is in the context only


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-llama")


def test_two_call_prefill_of_a_full_cache_equals_one_call(pair):
    model, tok = pair
    p = get_task("passkey").build(tok, 400, 0.5, 0)
    one = prefill(model, p.ids, DynamicCache(config=model.config))
    two = prefill(model, p.ids, DynamicCache(config=model.config), split=p.question_start)
    assert two.n_tokens == one.n_tokens == 400
    assert two.kv_bytes == one.kv_bytes
    assert torch.allclose(one.last_logits, two.last_logits, atol=1e-4)
    with pytest.raises(ValueError):
        prefill(model, p.ids, DynamicCache(config=model.config), split=400)


def test_agnostic_task_option_reaches_the_prefill(pair):
    model, tok = pair
    task = get_task("passkey", agnostic=True)
    assert task.options()["agnostic"] is True
    p = task.build(tok, 400, 0.5, 0)
    calls = []

    class Spy(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx == 0:
                calls.append(key_states.shape[2])
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    res = task.run(model, tok, p, lambda: Spy(config=model.config))
    assert calls[:2] == [p.question_start, 400 - p.question_start]
    aware = get_task("passkey").run(model, tok, p, lambda: DynamicCache(config=model.config))
    assert res["answer"] == aware["answer"]


def test_generate_with_context_prefills_it_first(tiny_model_dir):
    from kvslim.models import load

    model, tok = load(str(tiny_model_dir))
    ids, split = encode_split(tok, "w1 w2 w3 w4", "w5 w6", chat=False)
    assert 0 < split < ids.shape[1]
    assert tok.decode(ids[0, :split]).split()[-1] == "w4"
    res = generate(model, tok, "w5 w6", context="w1 w2 w3 w4", max_new_tokens=4, chat=False)
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert res.prompt_tokens == ids.shape[1]
    assert res.text == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()
    with pytest.raises(Exception, match="context is empty"):
        generate(model, tok, "w5", context="  ", chat=False)
