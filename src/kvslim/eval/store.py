"""The results store: one JSON line per finished cell in ``<out>/results.jsonl``, plus ``<out>/config.json``.

* A line is appended (and fsynced) as soon as its cell finishes, so a killed run loses at most the cells in flight;
  a half-written last line is cut off when the store is opened again.
* A cell's key is ``(task, model, recipe, length, depth, seed)``; a rerun skips keys already present.
* ``config.json`` holds what a result means (task, model, task options, prompt format): a run whose configuration
  differs is refused unless forced, so one folder never silently mixes incomparable results. The grid axes may grow
  between runs (more recipes, lengths, ...); the file records their union.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidInput

__all__ = ["ResultStore", "cell_key", "RESULTS", "CONFIG", "FORMAT"]

RESULTS = "results.jsonl"
CONFIG = "config.json"
FORMAT = 1  # bump when prompt construction or scoring changes meaning
IDENTITY = ("format", "task", "model", "options")
AXES = ("recipes", "lengths", "depths", "seeds")


def cell_key(rec: dict[str, Any]) -> tuple:
    """The identity of a cell: ``(task, model, recipe, length, depth, seed)`` (depth rounded to 6 places)."""
    return (rec["task"], rec["model"], rec["recipe"], int(rec["length"]), round(float(rec["depth"]), 6), int(rec["seed"]))


class ResultStore:
    """Append-only JSONL results with a run configuration next to them."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.dir = Path(out)
        self.results = self.dir / RESULTS
        self.config_path = self.dir / CONFIG

    # -- configuration -------------------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        return json.loads(self.config_path.read_text())

    def claim(self, config: dict[str, Any], force: bool = False, write: bool = True) -> None:
        """Check ``config`` against the folder's and (if ``write``) record it; a different one raises unless ``force``."""
        if self.dir.exists() and not self.dir.is_dir():
            raise InvalidInput(f"{self.dir} exists and is not a folder: give --out a folder path")
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
                merged[axis] = sorted(set(old.get(axis, [])) | set(config.get(axis, [])), key=_axis_order(axis))
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        tmp.replace(self.config_path)

    # -- results -------------------------------------------------------------------------------------------------
    def repair(self) -> int:
        """Cut a half-written last line (a run killed mid-write); returns the bytes removed."""
        if not self.results.is_file():
            return 0
        data = self.results.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with self.results.open("r+b") as fh:
            fh.truncate(keep)
        return len(data) - keep

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in file order (unparsable lines are skipped)."""
        if not self.results.is_file():
            return []
        out = []
        for line in self.results.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done(self) -> set[tuple]:
        """Keys of the finished cells."""
        return {cell_key(r) for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Append one finished cell and make it durable before returning."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=False) + "\n"
        with self.results.open("a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def _axis_order(axis: str) -> Any:
    if axis == "recipes":
        return lambda r: (r != "full", r)
    return float
