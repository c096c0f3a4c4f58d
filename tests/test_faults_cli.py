"""Issue 15, CLI paths, text and units: impossible output paths, non-UTF-8 argv, unreachable Ray, one k/M meaning,
exact numbers, duplicate --kv-format keys and bare configs. Every case: exit 2 with one ``error:`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvslim
from kvslim.cli import app
from kvslim.cli.cmd_niah import parse_list

SRC = str(Path(kvslim.__file__).resolve().parents[1])  # the kvslim under test, for subprocesses


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def one_line_error(code, output, text):
    assert code == 2 and "Traceback" not in output, output
    assert text in output, output
    assert output.count("error:") == 1, output


@pytest.mark.parametrize("where,text", [
    ("/proc/kvslim-plot.png", "cannot write"),
    ("FILE/plot.png", "is a file"),
    ("DIR", "is a folder"),
    ("plot.xyz", "give a file name ending in"),
    ("missing/plot.png", "does not exist"),
])
def test_plan_plot_in_impossible_places(tmp_path, where, text):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR.png").mkdir()
    path = where if where.startswith("/") else str(tmp_path / (where + (".png" if where == "DIR" else "")))
    one_line_error(*cli("plan", "llama-3.1-8b", "--plot", path), text)


@pytest.mark.parametrize("where,text", [
    ("/proc/kvslim-out", "cannot write"),
    ("FILE/out", "is a file"),
    ("FILE", "is not a folder"),
])
def test_niah_out_in_impossible_places(tmp_path, where, text):
    (tmp_path / "FILE").write_text("x")
    path = where if where.startswith("/") else str(tmp_path / where)
    one_line_error(*cli("niah", "-m", "tiny-llama", "-l", "400", "-d", "0", "-o", path), text)


def test_report_of_a_file_or_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_error(*cli("report", tmp_path / "f"), "holds no results.jsonl")
    one_line_error(*cli("report", ""), "empty")


def test_a_prompt_that_is_not_utf8_is_one_line():
    env = {**os.environ, "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-m", "kvslim", "generate", "-m", "tiny-llama", b"caf\xe9 \xff"],
                         capture_output=True, env=env, timeout=120)
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 2 and "Traceback" not in err
    assert "not valid UTF-8 text (byte 0xe9)" in err


def test_generate_refuses_a_surrogate_prompt_in_process():
    one_line_error(*cli("generate", "-m", "nope", "bad \udcff"), "not valid UTF-8")


def test_an_unreachable_ray_address_is_one_line_and_quick(tmp_path):
    t0 = time.perf_counter()
    code, out = cli("niah", "-m", "tiny-llama", "-l", "400", "-d", "0", "-o", tmp_path / "o", "--ray", "127.0.0.1:1")
    one_line_error(code, out, "cannot reach a Ray cluster at 127.0.0.1:1")
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "o").exists()
    one_line_error(*cli("niah", "-m", "tiny-llama", "-o", tmp_path / "o", "--ray", "nonsense"), "is not a Ray address")


def test_k_and_m_mean_the_same_in_every_command():
    assert parse_list("2k,1M,0.5k,1000", int, "lengths") == [2048, 1 << 20, 512, 1000]
    code, out = cli("plan", "llama-3.1-8b", "--context", "2k", "--json")
    assert code == 0 and json.loads(out)["contexts"] == [2048]
    for cmd in (["niah", "-m", "tiny-llama", "-d", "0", "-o", "unused", "-l"], ["plan", "llama-3.1-8b", "--context"]):
        one_line_error(*cli(*cmd, "0.8005k"), "not a whole number")


def test_niah_lengths_1M_is_a_length(tmp_path):
    code, out = cli("niah", "-m", "tiny-llama", "-l", "1M", "-d", "0", "-o", tmp_path / "o")
    one_line_error(code, out, "maximum context is 4096")  # parsed as 1,048,576 and refused against the model
    assert not (tmp_path / "o").exists()


def test_a_huge_context_is_exact_or_refused():
    n = (1 << 53) + 1  # not representable as a float
    code, out = cli("plan", "llama-3.1-8b", "--context", str(n), "--allow-beyond-max", "--json")
    assert code == 0 and json.loads(out)["contexts"] == [n]
    one_line_error(*cli("plan", "llama-3.1-8b", "--context", "9" * 30, "--allow-beyond-max"), "int64")
    one_line_error(*cli("plan", "llama-3.1-8b", "--fit", "--memory", "0.1B"), "not a whole number")


def test_kv_format_keys_are_given_once():
    one_line_error(*cli("plan", "llama-3.1-8b", "--kv-format", "kv=fp8,kv=fp4"), "gives kv= twice")


def test_a_config_with_only_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(*cli("plan", tmp_path / "config.json"), "lacks num_hidden_layers")


def test_markup_and_surrogates_in_error_messages_print_as_text():
    one_line_error(*cli("recipes", "--check", "[/bold]"), "[/bold]")
    one_line_error(*cli("recipes", "--check", "win\udcffdow"), "\\udcff")
