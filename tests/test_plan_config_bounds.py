"""Issue 25 defects 9 and 10: configs the planner cannot plan are refused in one line (no traceback, no MemoryError,
no silent plan): an absurd layer count, transformers' validation reason in full, query heads that are not a
multiple of the KV heads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvslim.cli import app
from kvslim.errors import InvalidInput
from kvslim.hf_config import MAX_LAYERS
from kvslim.plan.spec_hf import spec_from_config

BASE = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, intermediate_size=128, max_position_embeddings=2048)  # fmt: skip


def _plan(tmp_path, **fields):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, **fields}))
    res = CliRunner().invoke(app, ["plan", str(path), "--context", "1k"])
    assert "Traceback" not in res.output and not isinstance(res.exception, MemoryError), res.output
    return res


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


@pytest.mark.parametrize("n", [100_000_000_000, 10_000_000, MAX_LAYERS + 1])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "deepseek_v3"])
def test_absurd_layer_count_refused_before_building_layers(tmp_path, n, model_type):
    line = _one_error_line(_plan(tmp_path, model_type=model_type, num_hidden_layers=n))
    assert f"num_hidden_layers = {n:,}" in line and f"at most {MAX_LAYERS:,}" in line


def test_layer_count_bound_holds_for_config_objects_too():
    from transformers import LlamaConfig

    with pytest.raises(InvalidInput, match="num_hidden_layers = 100,000,000,000"):
        spec_from_config(LlamaConfig(**{**BASE, "num_hidden_layers": 100_000_000_000}))


def test_transformers_validation_reason_is_kept_on_one_line(tmp_path):
    line = _one_error_line(_plan(tmp_path, head_dim=7))
    assert "RoPE requires an even rotary dimension" in line and "head_dim`=7" in line


@pytest.mark.parametrize(("heads", "kv"), [(4, 3), (6, 4), (2, 4)])
def test_query_heads_must_be_a_multiple_of_kv_heads(tmp_path, heads, kv):
    fields = dict(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=192)
    line = _one_error_line(_plan(tmp_path, **fields))
    assert f"{heads} query heads over {kv} KV heads" in line and "multiple" in line
    with pytest.raises(InvalidInput, match="multiple of num_key_value_heads"):
        spec_from_config({**BASE, **fields})


def test_a_valid_config_still_plans(tmp_path):
    res = _plan(tmp_path, num_hidden_layers=MAX_LAYERS // 100)
    assert res.exit_code == 0, res.output
