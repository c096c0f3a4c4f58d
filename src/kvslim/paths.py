"""Where kvslim keeps files (``cache_dir()``: ``$KVSLIM_CACHE``, default ``~/.cache/kvslim``), and output paths and
text arguments checked up front, so a run never fails after its work is done.

``check_output_dir`` (a results folder: it may not exist yet, then its nearest existing ancestor must be a writable
folder and it is created like ``mkdir -p``), ``check_output_file`` (a file to write: its folder must exist and be
writable, the path itself must not be a folder), ``check_text`` (text from argv that is not valid UTF-8). Writability
is probed by creating and removing a temporary file, which also catches read-only mounts and pseudo file systems
(``/proc``) where permission bits say nothing. Every failure is one :class:`~kvslim.errors.InvalidInput` line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InvalidInput

__all__ = ["cache_dir", "check_output_dir", "check_output_file", "check_text"]


def cache_dir() -> Path:
    """Root of kvslim's on-disk caches (converted models, latent bases): ``$KVSLIM_CACHE`` or ``~/.cache/kvslim``."""
    return Path(os.environ.get("KVSLIM_CACHE") or Path.home() / ".cache" / "kvslim").expanduser()


def _probe(folder: Path, what: str, shown: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".kvslim-probe-", dir=folder)
    except OSError as exc:
        raise InvalidInput(f"{what} {shown}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _empty(path: str | os.PathLike, what: str) -> Path:
    text = os.fspath(path)
    if not text.strip():
        raise InvalidInput(f"{what} is empty: give a path")
    if "\0" in text:
        raise InvalidInput(f"{what} {text!r} holds a NUL character")
    return Path(text).expanduser()


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as a folder kvslim may create and write into; anything else raises ``InvalidInput``."""
    p = _empty(path, what)
    if p.exists():
        if not p.is_dir():
            raise InvalidInput(f"{what} {p} exists and is not a folder: give a folder path")
        _probe(p, what, p)
        return p
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidInput(f"{what} {p}: {parent} is a file, so no folder can be made below it")
    _probe(parent, what, p)
    return p


def check_output_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a file kvslim may (over)write; ``suffixes`` (lower-case, with the dot) restrict its extension."""
    p = _empty(path, what)
    if suffixes and p.suffix.lower() not in suffixes:
        raise InvalidInput(f"{what} {p}: give a file name ending in {', '.join(suffixes)}")
    if p.is_dir():
        raise InvalidInput(f"{what} {p} is a folder: give a file path")
    parent = p.parent
    if not parent.exists():
        raise InvalidInput(f"{what} {p}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise InvalidInput(f"{what} {p}: {parent} is a file, not a folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise InvalidInput(f"{what} {p} exists and is not writable")
    _probe(parent, what, p)
    return p


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode (argv bytes that are not UTF-8 arrive as lone surrogates); else one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(text[exc.start]) <= 0xDCFF else b""
        byte = f" (byte 0x{bad.hex()})" if bad else ""
        raise InvalidInput(f"{what} is not valid UTF-8 text{byte} at character {exc.start}: pass UTF-8 text") from None
    return text
