"""The results store: one JSON line per finished cell in ``<out>/results.jsonl``, plus ``<out>/config.json``.

* One writer per folder: a run holds ``<out>/.lock`` (an exclusive ``flock`` on a file holding the writer's pid);
  a second run on the same folder is refused naming that pid. The kernel drops the lock when its holder dies, even
  by ``SIGKILL``, so a stale lock is simply taken over.
* A line is appended (and fsynced) as soon as its cell finishes, so a killed run loses at most the cells in flight.
  When the store is opened again a half-written last line is cut off; a complete last record that only lacks its
  newline is kept (the newline is added).
* Every line is validated on read (UTF-8, a JSON object, the fields and types a record needs); bad lines are
  reported with their line numbers and skipped, never a crash. A cell's key is
  ``(task, model, recipe, length, depth, seed)``: a rerun skips keys already present, and of duplicate records of
  one key the first wins (duplicates that disagree are reported, never averaged).
* ``config.json`` holds what a result means (task, model, task options, prompt format): a run whose configuration
  differs is refused unless forced, so one folder never silently mixes incomparable results. The grid axes may grow
  between runs (more recipes, lengths, ...); the file records their union.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InvalidInput

__all__ = ["ResultStore", "Records", "cell_key", "check_record", "RESULTS", "CONFIG", "LOCK", "FORMAT"]

RESULTS = "results.jsonl"
CONFIG = "config.json"
LOCK = ".lock"
FORMAT = 1  # bump when prompt construction or scoring changes meaning
IDENTITY = ("format", "task", "model", "options")
AXES = ("recipes", "lengths", "depths", "seeds")
_RESULT_FIELDS = ("success", "score", "answer", "kv_bytes")  # what differs between conflicting duplicates


def cell_key(rec: dict[str, Any]) -> tuple:
    """The identity of a cell: ``(task, model, recipe, length, depth, seed)`` (depth rounded to 6 places)."""
    return (rec["task"], rec["model"], rec["recipe"], int(rec["length"]), round(float(rec["depth"]), 6), int(rec["seed"]))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_record(rec: Any) -> str | None:
    """Why ``rec`` (a parsed JSON line) is not a usable record, or None when it is."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__ if rec is not None else 'null'}, not a record object"
    for k in ("task", "model", "recipe"):
        if not isinstance(rec.get(k), str) or not rec[k]:
            return f"{k!r} is missing or not a non-empty string"
    for k, lo in (("length", 1), ("seed", None), ("kv_bytes", 0), ("prompt_tokens", 1)):
        v = rec.get(k)
        if not _is_int(v) or (lo is not None and v < lo):
            return f"{k!r} is missing or not a whole number{f' >= {lo}' if lo is not None else ''} (got {v!r})"
    d = rec.get("depth")
    if not _is_num(d) or not 0.0 <= d <= 1.0:
        return f"'depth' is missing or not a number in [0, 1] (got {d!r})"
    s = rec.get("score")
    if not _is_num(s):
        return f"'score' is missing or not a number (got {s!r})"
    if "success" not in rec or rec["success"] not in (True, False, None):
        return f"'success' is missing or not true/false/null (got {rec.get('success')!r})"
    for k in ("cold_bytes", "fetched_bytes"):  # tiered caches only; older records lack them
        if rec.get(k) is not None and not (_is_int(rec[k]) and rec[k] >= 0):
            return f"{k!r} is not a whole number >= 0 (got {rec[k]!r})"
    for k in ("kv_bytes_full16", "ppl"):
        if rec.get(k) is not None and not _is_num(rec[k]):
            return f"{k!r} is not a number (got {rec[k]!r})"
    return None


class StoreBusy(InvalidInput):
    """The results folder is held by another live run (its ``.lock``); a scheduler may try another folder first."""


@dataclass
class Records:
    """What reading ``results.jsonl`` found: the usable records (first of each cell), and what was skipped."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    duplicates: list[tuple[tuple, list[int], bool]] = field(default_factory=list)  # (key, lines, results differ)

    def messages(self, path: Path) -> list[str]:
        """One warning line per bad line and per duplicated cell."""
        out = [f"{path} line {n}: {why}; skipped" for n, why in self.bad]
        for key, lines, differ in self.duplicates:
            task, model, recipe, length, depth, seed = key
            what = "with different results" if differ else "with identical results"
            out.append(f"{path}: cell {recipe} / {task} / {model} length={length} depth={depth:g} seed={seed} is "
                       f"stored {len(lines)} times {what} (lines {', '.join(map(str, lines))}); line {lines[0]} is used")  # fmt: skip
        return out


class ResultStore:
    """Append-only JSONL results with a run configuration next to them; one writer at a time (:meth:`lock`)."""

    def __init__(self, out: str | os.PathLike, recipe_key: Any = None) -> None:
        self.dir = Path(out)
        self.results = self.dir / RESULTS
        self.config_path = self.dir / CONFIG
        self.lock_path = self.dir / LOCK
        self.recipe_key = recipe_key  # maps a stored recipe name to its canonical form (older spellings)
        self._lock_fd: int | None = None

    # -- one writer ----------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Become the folder's only writer, or raise :class:`StoreBusy` (an ``InvalidInput``) naming the holder's pid."""
        import fcntl

        if self._lock_fd is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreBusy(
                f"{self.dir} is being written by another kvslim run (pid {holder}): wait for it to finish, or use "
                "another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock; the file stays (deleting it would race a new locker)
            self._lock_fd = None

    @contextmanager
    def writing(self, config: dict[str, Any], say: Callable[[str], None], force: bool = False) -> Iterator[set[tuple]]:
        """A run's write session: become the only writer (:meth:`lock`, the first thing written), record ``config``
        (:meth:`claim`), cut a half-written last line (:meth:`repair`), pass every problem found in the stored lines
        to ``say`` and yield the keys (:func:`cell_key`) of the cells already done; unlock at the end."""
        self.lock()
        try:
            self.claim(config, force=force)
            self.repair()
            found = self.read()
            for msg in found.messages(self.results):
                say(msg)
            yield {cell_key(r) for r in found.records}
        finally:
            self.unlock()

    # -- configuration -------------------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        try:
            cfg = json.loads(self.config_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{self.config_path} is damaged ({exc}): delete it to keep the results and start a new "
                               "configuration, or use another --out") from None  # fmt: skip
        if not isinstance(cfg, dict):
            raise InvalidInput(f"{self.config_path} is not a JSON object: delete it, or use another --out")
        return cfg

    def claim(self, config: dict[str, Any], force: bool = False, write: bool = True) -> None:
        """Check ``config`` against the folder's and (if ``write``) record it; a different one raises unless ``force``."""
        if self.dir.exists() and not self.dir.is_dir():
            raise InvalidInput(f"{self.dir} exists and is not a folder: give --out a folder path")
        for p in (self.results, self.config_path, self.lock_path):
            if p.exists() and not p.is_file():
                raise InvalidInput(f"{p} exists and is not a file: move it away, or use another --out")
        old = self.read_config()
        if old is not None and not force:
            diff = [k for k in IDENTITY if old.get(k) != config.get(k)]
            if diff:
                detail = "; ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in diff)
                raise InvalidInput(
                    f"{self.dir} holds results of a different configuration ({detail}): use another --out, or --force to mix"
                )
        if not write:
            return
        merged = dict(config)
        if old is not None and not force:
            for axis in AXES:
                vals = old.get(axis) if isinstance(old.get(axis), list) else []
                kind = str if axis == "recipes" else (int, float)
                vals = [v for v in vals if isinstance(v, kind) and not isinstance(v, bool)]
                merged[axis] = sorted(set(vals) | set(config.get(axis, [])), key=_axis_order(axis))
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        tmp.replace(self.config_path)

    # -- results -------------------------------------------------------------------------------------------------
    def repair(self) -> int:
        """Cut a half-written last line (a run killed mid-write); returns the bytes removed. A last line that is a
        complete record missing only its newline is kept and the newline added."""
        if not self.results.is_file():
            return 0
        data = self.results.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        if self._parse(data[keep:])[1] is None:  # complete: only the newline is missing
            with self.results.open("ab") as fh:
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            return 0
        with self.results.open("r+b") as fh:
            fh.truncate(keep)
        return len(data) - keep

    @staticmethod
    def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"not UTF-8 text (byte {exc.start})"
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, f"not JSON ({exc.msg})"
        why = check_record(rec)
        return (rec, None) if why is None else (None, why)

    def read(self) -> Records:
        """Validated records in file order: the first record of each cell, bad lines and duplicates reported."""
        out = Records()
        if not self.results.is_file():
            return out
        first: dict[tuple, tuple[int, dict[str, Any]]] = {}
        dup_lines: dict[tuple, list[int]] = {}
        differ: dict[tuple, bool] = {}
        for n, raw in enumerate(self.results.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            rec, why = self._parse(raw)
            if rec is None:
                out.bad.append((n, why or "unreadable"))
                continue
            if self.recipe_key is not None:
                rec["recipe"] = self.recipe_key(rec["recipe"])
            key = cell_key(rec)
            if key in first:
                dup_lines.setdefault(key, [first[key][0]]).append(n)
                kept = first[key][1]
                differ[key] = differ.get(key, False) or any(kept.get(f) != rec.get(f) for f in _RESULT_FIELDS)
                continue
            first[key] = (n, rec)
            out.records.append(rec)
        out.duplicates = [(k, lines, differ[k]) for k, lines in dup_lines.items()]
        return out

    def records(self) -> list[dict[str, Any]]:
        """The usable records (first of each cell) in file order; see :meth:`read` for what was skipped."""
        return self.read().records

    def done(self) -> set[tuple]:
        """Keys of the finished cells."""
        return {cell_key(r) for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Append one finished cell and make it durable before returning."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=False) + "\n"
        with self.results.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def _axis_order(axis: str) -> Any:
    if axis == "recipes":
        return lambda r: (r != "full", r)
    return float
