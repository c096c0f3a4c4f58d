"""``kvslim plan``: table, --json rows, --baseline ratios, --plot, --fit, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvslim.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["plan", *args])


def test_json_rows_and_ratios() -> None:
    res = run("deepseek-v4-pro", "--baseline", "deepseek-v3.2", "--context", "1M,128k", "--kv-format", "production",
              "--allow-beyond-max", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["contexts"] == [1 << 20, 1 << 17]
    rows = {(r["model"], r["context"]): r for r in out["rows"]}
    assert set(rows) == {(m, c) for m in ("deepseek-v4-pro", "deepseek-v3.2") for c in out["contexts"]}
    base, pro = rows[("deepseek-v3.2", 1 << 20)], rows[("deepseek-v4-pro", 1 << 20)]
    assert base["kv_bytes"] == 61 * 788 * (1 << 20)
    assert pro["kv_ratio"] == pytest.approx(pro["kv_bytes"] / base["kv_bytes"])
    assert 0.085 <= pro["kv_ratio"] <= 0.115
    assert pro["decode_flops"] == pro["decode_flops_breakdown"]["total"] > 0
    assert base["kv_ratio"] == 1.0


def test_table_output() -> None:
    res = run("smollm2-135m", "--context", "8k,1k")
    assert res.exit_code == 0, res.output
    assert "context 8k (8,192 tokens)" in res.output and "context 1k (1,024 tokens)" in res.output
    assert "smollm2-135m" in res.output and "GFLOP/tok" in res.output
    assert "0.176" in res.output  # 30 layers x 2 x 3 heads x 64 x 2 B x 8192 = 0.1758 GiB


def test_default_contexts_stop_at_the_model_maximum() -> None:
    out = json.loads(run("gemma3-270m", "--json").output)
    assert out["contexts"] == [4096, 32768]


def test_fit(tmp_path) -> None:
    res = run("llama-3.1-8b", "--context", "128k", "--fit", "--memory", "80GB", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["rows"][0]["fit"]["sequences"] == 3
    res = run("llama-3.1-8b", "--context", "128k", "--fit", "--memory", "141GiB", "--weights-format", "fp8")
    assert res.exit_code == 0 and "seqs fit" in res.output


def test_plot(tmp_path) -> None:
    path = tmp_path / "kv.png"
    res = run("deepseek-v4-flash", "--baseline", "llama-3.1-8b", "--context", "8k,128k", "--plot", str(path))
    assert res.exit_code == 0, res.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deepseek-v4-prp"], "did you mean deepseek-v4-pro"),
        (["llama-3.1-8b", "--context", "0"], "positive"),
        (["llama-3.1-8b", "--context", "-8k"], "positive"),
        (["llama-3.1-8b", "--context", "1M"], "--allow-beyond-max"),
        (["llama-3.1-8b", "--kv-format", "fp7"], "unknown storage format"),
        (["llama-3.1-8b", "--kv-format", "fp8_ds_v4"], "cannot use it"),
        (["llama-3.1-8b", "--fit"], "--fit needs --memory"),
        (["llama-3.1-8b", "--fit", "--memory", "lots"], "bad memory size"),
        (["llama-3.1-8b", "--fit", "--memory", "80GB", "--weights-format", "tq3"], "weights format"),
        (["/nonexistent/config.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], message: str) -> None:
    res = run(*args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert res.output.strip().startswith("error:")
