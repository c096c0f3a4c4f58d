"""The ``kvslim`` command line (typer + rich).

Each command lives in its own module ``kvslim/cli/cmd_<name>.py`` exposing ``register(app)``; ``COMMANDS`` lists
them in help order. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is quick.
"""

from __future__ import annotations

import importlib
import os
import warnings

import typer

__all__ = ["app", "main", "COMMANDS"]

COMMANDS: tuple[str, ...] = ("models", "generate", "plan", "recipes", "niah", "report")

app = typer.Typer(
    name="kvslim",
    help="Plan, run and measure DeepSeek-V4-style KV-cache compression on real models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)



@app.callback()
def _setup() -> None:
    """Plan, run and measure DeepSeek-V4-style KV-cache compression on real models."""
    # The CLI never touches a hub, and shows its own spinners instead of transformers' bars and advisories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


for _name in COMMANDS:
    importlib.import_module(f"kvslim.cli.cmd_{_name}").register(app)


def main() -> None:
    import sys

    from .cmd_niah import expand_bare_ray

    app(args=expand_bare_ray(sys.argv[1:]), prog_name="kvslim")
