"""The ``kvslim`` command line (typer + rich).

Each command lives in its own module ``kvslim/cli/cmd_<name>.py`` exposing ``register(app)``; ``COMMANDS`` lists
them in help order. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is quick.
"""

from __future__ import annotations

import importlib

import typer

__all__ = ["app", "main", "COMMANDS"]

COMMANDS: tuple[str, ...] = ("models", "generate", "recipes", "niah", "report")

app = typer.Typer(
    name="kvslim",
    help="Plan, run and measure DeepSeek-V4-style KV-cache compression on real models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for _name in COMMANDS:
    importlib.import_module(f"kvslim.cli.cmd_{_name}").register(app)


def main() -> None:
    import sys

    from .cmd_niah import expand_bare_ray

    app(args=expand_bare_ray(sys.argv[1:]), prog_name="kvslim")
