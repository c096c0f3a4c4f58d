"""Shared CLI plumbing: consoles, one-line errors, spinners, number formatting."""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from rich.console import Console

from ..errors import KvslimError, KvslimWarning

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def safe_text(text: str) -> str:
    """``text`` printable on any terminal: lone surrogates (undecodable bytes of argv or file names) escaped, rich
    markup escaped (a message quoting ``[/x]`` must not be read as a closing tag)."""
    from rich.markup import escape

    return escape(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def warn_line(message: str) -> None:
    """One ``warning: ...`` line on stderr."""
    err_console.print(f"[bold yellow]warning:[/] {safe_text(message)}", highlight=False, soft_wrap=True)


def one_line_errors(fn: F) -> F:
    """Turn a ``KvslimError`` (or an ``OSError`` of the environment: disk full, permissions) raised by a command into
    ``error: <message>`` on stderr and exit status 2; print each ``KvslimWarning`` as one ``warning: ...`` line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            previous = warnings.showwarning

            def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
                if issubclass(category, KvslimWarning):
                    warn_line(str(message))
                else:
                    previous(message, category, filename, lineno, file, line)

            warnings.showwarning = show  # restored by catch_warnings on exit
            try:
                return fn(*args, **kwargs)
            except (KvslimError, OSError) as exc:
                text = str(exc) if isinstance(exc, KvslimError) else _os_error(exc)
                err_console.print(f"[bold red]error:[/] {safe_text(text)}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def _os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


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
