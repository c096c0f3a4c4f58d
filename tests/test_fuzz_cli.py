"""Issue 15, fuzzing the CLI (hypothesis): numeric options, unit strings, recipe strings, formats and prompts never
give a traceback: the exit status is 0, or 2 with one error line, and niah never writes config.json or loads a model
for input it refuses (the model loader is replaced by a sentinel error: reaching it means validation passed)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kvslim.cli import app
from kvslim.errors import InvalidInput

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NASTY = st.sampled_from(["[/bold]", "[red]x[/]", "caf\udce9", "\udcff", "\x00", " ", "", "-1", "1e309", "nan"])
NUMBER = st.one_of(
    st.from_regex(r"\A[+-]?\d{0,25}(\.\d{0,6})?\s?[kKmMgGbB]?(i?[bB])?\Z", fullmatch=True),
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
    NASTY,
)
LISTS = st.lists(NUMBER, min_size=0, max_size=4).map(",".join)
RECIPE = st.one_of(
    st.from_regex(r"\A(full|window|stream|blocks|v4|latent|sinks|[a-z]{1,6})(:([a-z]{1,6}=[-\d.e]{0,30},?){0,3})?"
                  r"(\+[a-z0-9.]{0,6})?\Z", fullmatch=True),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=30),
    NASTY,
)
TEXT = st.one_of(NASTY, st.text(alphabet=st.characters(exclude_categories=()), max_size=20))


def _ok(res) -> None:
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in (0, 2), (res.exit_code, res.output)
    if res.exit_code == 2:
        assert "error" in res.output.lower(), res.output


@FUZZ
@given(context=LISTS, memory=NUMBER, fmt=st.one_of(st.sampled_from(["bf16", "fp8", "production", "kv=fp8,index=fp4"]),
                                                   TEXT), fit=st.booleans())
def test_plan_numbers_and_formats(context, memory, fmt, fit):
    args = ["plan", "llama-3.1-8b", "--json", "--context", context, "--kv-format", fmt]
    if fit:
        args += ["--fit", "--memory", memory]
    _ok(CliRunner().invoke(app, args))


@pytest.fixture
def no_model(monkeypatch):
    import kvslim.eval.harness.runner as runner

    def sentinel(name):
        raise InvalidInput("__validated__")

    monkeypatch.setattr(runner, "load_pair", sentinel)


@FUZZ
@given(lengths=LISTS, depths=LISTS, seeds=LISTS, recipes=st.lists(RECIPE, max_size=3).map(",".join),
       ints=st.lists(st.one_of(st.none(), NUMBER), min_size=5, max_size=5),
       task=st.sampled_from(["passkey", "needle", "multi-needle", "fidelity"]))
def test_niah_options(no_model, lengths, depths, seeds, recipes, ints, task):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = ["niah", "-m", "smollm2-135m", "-t", task, "-o", str(out), "--json", "-l", lengths, "-d", depths,
                "-s", seeds, "-r", recipes]
        for flag, v in zip(["--needles", "--eval-tokens", "--max-new-tokens", "--workers", "--threads"], ints):
            if v is not None:
                args += [flag, v]
        res = CliRunner().invoke(app, args)
        _ok(res)
        assert res.exit_code == 2  # either refused, or validated and stopped at the model loader
        assert not (out / "config.json").exists() and not (out / "results.jsonl").exists()


@FUZZ
@given(recipe=RECIPE)
def test_recipe_strings(recipe):
    _ok(CliRunner().invoke(app, ["recipes", "--check", recipe, "--json"]))


@FUZZ
@given(prompt=TEXT, n=NUMBER, recipe=st.one_of(st.none(), RECIPE))
def test_generate_arguments(monkeypatch, prompt, n, recipe):
    import kvslim.models

    def sentinel(*a, **k):
        raise InvalidInput("__validated__")

    monkeypatch.setattr(kvslim.models, "load", sentinel)
    args = ["generate", "-n", n] + (["-r", recipe] if recipe is not None else []) + ["--", prompt]
    _ok(CliRunner().invoke(app, args))
