"""Shared CLI plumbing: consoles, one-line errors, spinners, number formatting."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from rich.console import Console

from ..errors import KvslimError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Turn a ``KvslimError`` raised by a command into ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KvslimError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def spinner(message: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A rich status spinner on stderr; yields a callback that updates its text."""
    if not enabled:
        yield lambda _msg: None
        return
    with err_console.status(message) as status:
        yield lambda msg: status.update(msg)


def print_json(obj: Any) -> None:
    """One JSON object on one line on stdout (for machines)."""
    typer.echo(json.dumps(obj, sort_keys=False, default=str))


def fmt_bytes(n: float) -> str:
    """Human-readable bytes with binary prefixes (B, KiB, MiB, GiB, TiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
