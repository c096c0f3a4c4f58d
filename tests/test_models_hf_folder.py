"""``kvslim models --hf-folder NAME``: the plain safetensors folder of an embedded model, the one vLLM loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner


def test_unknown_model_is_one_line():
    from kvslim.cli import app

    res = CliRunner().invoke(app, ["models", "--hf-folder", "nope"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown model 'nope'" in lines[0] and "smollm2-135m" in lines[0]


@pytest.mark.slow
def test_prints_the_folder_vllm_loads():
    from kvslim.cli import app
    from kvslim.models import hf_folder

    res = CliRunner().invoke(app, ["models", "--hf-folder", "smollm2-135m", "--json"])
    assert res.exit_code == 0, res.output
    folder = Path(json.loads(res.stdout.strip().splitlines()[-1])["folder"])  # stderr: progress bars
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert hf_folder("smollm2-135m") == folder
