"""The reuse tasks (issue 24): multi-turn, multi-request, long-list, long-copy. Prompts (deterministic per seed,
depth placement, the question split shared by agnostic and aware runs), scoring with partial credit, the per-turn
and per-fork runs on the tiny model, and one grid cell of each through run_grid and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kvslim.cache import make_cache
from kvslim.eval.harness.runner import Grid, run_grid
from kvslim.eval.harness.tiny import tiny_pair, tiny_tokenizer
from kvslim.eval.tasks import reuse
from kvslim.eval.tasks.base import TASKS, get_task
from kvslim.eval.tasks.long_copy import copy_score, score_copy, words_of
from kvslim.eval.tasks.long_list import score_list

REUSE = ["multi-turn", "multi-request", "long-list", "long-copy"]
SMALL = {"multi-turn": {"k": 3}, "multi-request": {"k": 3}, "long-list": {"k": 3}, "long-copy": {"words": 12}}
RECALL = "recall:m=4,k=2,w=16,sinks=2"


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("tiny-llama")


def _target_position(p):
    """Where the needle the grid's depth names sits: after round(depth * H) haystack tokens and the needles before."""
    t = p.meta.get("target", 0)
    return p.needle_positions[t], t


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("name", REUSE)
def test_prompts_are_deterministic_and_place_the_depth(name, chat):
    tok = tiny_tokenizer(chat=chat)
    task = get_task(name, **SMALL[name])
    for depth in (0.0, 0.5, 1.0):
        p = task.build(tok, 900, depth, 3)
        assert len(p) == 900 and p.ids == task.build(tok, 900, depth, 3).ids
        assert p.ids != task.build(tok, 900, depth, 4).ids
        pos, t = _target_position(p)
        assert pos == p.haystack_start + round(depth * p.haystack_tokens) + sum(map(len, p.needle_ids[:t]))
        question = tok.decode(p.ids[p.question_start :])
        assert question.lstrip().startswith(("What", "List", "Copy"))
        assert all(a not in question for a in p.answers)  # the answers are in the context only
    # agnostic and aware runs share every prompt (the same split)
    flip = not get_task(name).agnostic
    q = get_task(name, agnostic=flip, **SMALL[name]).build(tok, 900, 0.5, 3)
    assert q.ids == task.build(tok, 900, 0.5, 3).ids and q.question_start == task.build(tok, 900, 0.5, 3).question_start


@pytest.mark.parametrize("name", ["multi-turn", "multi-request"])
def test_one_question_per_needle_and_the_turn_pieces(name):
    tok = tiny_tokenizer(chat=True)
    p = get_task(name, k=4).build(tok, 900, 0.25, 0)
    turns = p.meta["turns"]
    assert len(turns) == 4 and p.ids[p.question_start :] == turns[0].ids
    assert [t.answers[0] for t in turns] == p.answers and len(set(p.answers)) == 4
    assert p.meta["depths"][p.meta["target"]] == 0.25
    text = tok.decode(p.ids[: p.question_start])
    for key, t in zip(p.meta["keys"], turns, strict=True):
        assert key in t.question and t.answers[0] in text and text.count(t.answers[0]) == 1
    later = tok.decode(turns[1].ids)
    if name == "multi-turn":  # closes the answer and opens a new user turn
        assert later.startswith("</s>\n<|turn|>user\nWhat") and later.count("<|turn|>assistant") == 1
    else:  # follows the context directly, as turn 0 does
        assert later.startswith("\n\nWhat") and "<|turn|>user" not in later
    assert p.max_new_tokens >= turns[0].max_new_tokens  # the grid's context check covers the later tokens


def test_copy_and_list_scoring_give_partial_credit():
    text = "Alpha beta gamma delta. Epsilon zeta eta theta."
    assert copy_score(text, text) == 1.0
    assert copy_score("alpha beta gamma delta", text) == 0.5
    assert copy_score("Alpha, beta! gamma delta. Epsilon zeta eta theta", text) == 1.0  # punctuation and case
    assert copy_score("theta eta zeta epsilon", text) == 0.125  # order matters: one word in order
    assert copy_score("alpha extra beta words gamma", text) == 3 / 8  # insertions cost nothing but length
    assert copy_score("", text) == 0.0 and words_of("A-b c") == ["a", "b", "c"]

    class P:
        meta = {"passage": text, "keys": ["foo-bar", "baz-qux"]}

    res = score_copy({"answer": "alpha beta gamma delta", "success": True, "retrieved": 1.0, "score": -3.0}, P)
    assert res["score"] == res["retrieved"] == 0.5 and res["success"] is False
    res = score_list({"answer": "foo-bar: 1234567", "retrieved": 0.5, "success": False, "score": -9.0}, P)
    assert res["score"] == 0.5 and res["keys_found"] == 0.5


def test_multi_turn_scores_each_turn_and_decodes_answers_into_the_cache(pair, monkeypatch):
    """Turns 0 and 2 answered, turn 1 not: score 2/3. Every answer token reaches the cache before the next
    question: the cache ends holding the prompt, every answer and every later turn."""
    model, tok = pair
    task = get_task("multi-turn", k=3)
    p = task.build(tok, 600, 0.5, 0)
    turns = p.meta["turns"]
    planned = [tok(" " + turns[0].answers[0], add_special_tokens=False)["input_ids"], [65, 66, 67],
               tok(" " + turns[2].answers[0], add_special_tokens=False)["input_ids"]]  # fmt: skip
    seen = []

    def fake_greedy(model, pre, n, stop):  # what greedy does: every token but the last fed
        seen.append(int(pre.cache.get_seq_length()))
        toks = planned[len(seen) - 1]
        for t in toks[:-1]:
            pre.last_logits = reuse._feed(model, pre.cache, [t])
        return toks

    monkeypatch.setattr(reuse, "greedy", fake_greedy)
    cache = make_cache(model, RECALL)
    res = task.run(model, tok, p, lambda: cache)
    assert [t["success"] for t in res["turns"]] == [True, False, True]
    assert res["score"] == pytest.approx(2 / 3) and res["success"] is False
    assert res["retrieved"] == pytest.approx(2 / 3, abs=1e-4) and res["answer"].count(" | ") == 2
    assert seen[0] == len(p)
    assert seen[1] == len(p) + len(planned[0]) + len(turns[1].ids)
    assert seen[2] == seen[1] + len(planned[1]) + len(turns[2].ids)
    assert int(cache.get_seq_length()) == seen[2] + len(planned[2]) - 1
    assert res["kv_bytes_last"] > res["kv_bytes"] and res["cold_bytes"] > 0


def test_multi_request_forks_one_prefill(pair):
    """Agnostic: one cache built and prefilled with the context, then forked per request; each fork answers what a
    fresh cache prefilled with context, then question, answers. Aware: one fresh cache per request."""
    model, tok = pair
    p = get_task("multi-request", k=3).build(tok, 600, 0.5, 0)
    built = []

    def make():
        built.append(make_cache(model, RECALL))
        return built[-1]

    res = get_task("multi-request", k=3).run(model, tok, p, make)
    assert len(built) == 1 and len(res["turns"]) == 3
    assert built[0].get_seq_length() == p.question_start  # the parent holds the context only
    assert res["requests_cold_bytes"] < 3 * res["cold_bytes"]  # the context's cold rows held once
    for i, turn in enumerate(p.meta["turns"]):  # each fork = a fresh cache fed the same two calls
        q = reuse.Prompt(p.ids[: p.question_start] + turn.ids, [], [], 0, 0, turn.answers, turn.answer_ids,
                         turn.max_new_tokens, {"turns": [turn]})  # fmt: skip
        q.haystack_tokens = p.question_start  # question_start = the same split
        one = reuse.run_conversation(model, tok, q, lambda: make_cache(model, RECALL), agnostic=True)
        assert one["turns"][0]["answer"] == res["turns"][i]["answer"]
        assert one["turns"][0]["logprob"] == res["turns"][i]["logprob"]
    built.clear()
    aware = get_task("multi-request", k=3, agnostic=False).run(model, tok, p, make)
    assert len(built) == 3 and all(c.get_seq_length() > p.question_start for c in built)
    assert len(aware["turns"]) == 3


def test_fork_free_full_cache_agrees_agnostic_and_aware(pair):
    """full is lossless: the forked (agnostic) and the one-call (aware) requests give the same log-probabilities
    up to float rounding."""
    from transformers import DynamicCache

    model, tok = pair
    p = get_task("multi-request", k=2).build(tok, 500, 0.5, 1)
    a = get_task("multi-request", k=2).run(model, tok, p, lambda: DynamicCache(config=model.config))
    b = get_task("multi-request", k=2, agnostic=False).run(model, tok, p, lambda: DynamicCache(config=model.config))
    for x, y in zip(a["turns"], b["turns"], strict=True):
        assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-3)


@pytest.mark.parametrize("name", REUSE)
def test_one_grid_cell_end_to_end(tmp_path, pair, name):
    from kvslim.eval.reports.report import summarize
    from kvslim.eval.reports.stats import wilson

    res = run_grid(Grid(task=name, model="tiny-llama", recipes=[RECALL], lengths=[700], depths=[0.5], seeds=[0],
                        options=SMALL[name]), tmp_path, pair=pair, progress=False)  # fmt: skip
    assert res["ran"] == 2
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len({r["prompt_hash"] for r in recs}) == 1 and {r["task"] for r in recs} == {name}
    for r in recs:
        assert 0.0 <= r["score"] <= 1.0 and isinstance(r["success"], bool)
        if name.startswith("multi"):
            assert len(r["turns"]) == 3 and r["score"] == sum(t["success"] for t in r["turns"]) / 3
    (summary,) = summarize(recs)
    assert [row.cells for row in summary.rows] == [1, 1] and summary.metric == "accuracy"
    assert wilson(summary.rows[0].mean_acc, summary.rows[0].cells)[1] <= 1.0
    assert run_grid(Grid(task=name, model="tiny-llama", recipes=[RECALL], lengths=[700], depths=[0.5], seeds=[0],
                         options=SMALL[name]), tmp_path, pair=pair, progress=False)["ran"] == 0  # fmt: skip


def test_cli_runs_a_reuse_task(tmp_path):
    from kvslim.cli import app

    assert set(REUSE) <= set(TASKS)
    out = tmp_path / "run"
    args = ["niah", "-m", "tiny-llama", "-t", "multi-turn", "-k", "2", "-l", "500", "-d", "0.5", "-o", str(out), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["ran"] == 1
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and "acc@500" in res.output, res.output


def test_bad_options_are_refused():
    from kvslim.errors import InvalidInput

    for name, kw in (("multi-turn", {"k": 17}), ("multi-request", {"k": 0}), ("long-list", {"k": 99}),
                     ("long-copy", {"words": 2})):  # fmt: skip
        with pytest.raises(InvalidInput):
            get_task(name, **kw)
    assert torch.is_tensor(torch.zeros(1))


def test_the_reuse_suite_runs_every_task_with_shared_options():
    from kvslim.eval.harness.suite import SUITES, suite_grids

    assert SUITES["reuse"] == tuple(REUSE)
    grids = suite_grids("reuse", model="tiny-llama", recipes=["full"], lengths=[700], depths=[0.25, 0.75], seeds=[0],
                        options={"agnostic": True, "k": 2})  # fmt: skip
    assert [g.task for g in grids] == REUSE and all(g.seeds == [0] and g.depths == [0.25, 0.75] for g in grids)
    assert all(g.options["agnostic"] is True for g in grids)
    assert [g.options.get("k") for g in grids] == [2, 2, 2, None]  # long-copy has no k


def test_multi_request_leaves_no_cold_files(tmp_path, pair):
    """store=disk: the parent, the forks and the frozen rows they shared are all released when the cell ends."""
    import gc
    import os
    import tempfile
    from pathlib import Path

    def mine():
        return {p for p in Path(tempfile.gettempdir()).glob(f"kvslim-cold-{os.getpid()}-*")}

    before = mine()
    run_grid(Grid(task="multi-request", model="tiny-llama", recipes=[f"{RECALL},store=disk"], lengths=[600],
                  depths=[0.5], seeds=[0], options={"k": 3}), tmp_path, pair=pair, progress=False)  # fmt: skip
    assert mine() - before == set()  # without garbage collection: close() released them
    gc.collect()
