"""The grid runner: model x recipes x lengths x depths x seeds, resumable, on a local or a Ray executor.

Order of work (nothing heavy happens before every check has passed):

1. the grid is validated (names, empty axes, depths in [0, 1], positive lengths) and the recipes are checked;
2. the output folder's configuration is claimed (a different configuration is refused unless ``force``);
3. the model is loaded and every prompt is built once per ``(length, depth, seed)``; a prompt that does not fit the
   model's context (prompt + answer budget) is refused, naming the length; each recipe builds one empty cache so a
   recipe the model cannot take is refused too;
4. the unfinished cells run (grouped so consecutive cells share a prompt) and each finished cell is appended to
   ``results.jsonl`` at once. Every recipe sees exactly the same token ids (``prompt_hash`` in each record).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ContextTooLong, InvalidInput
from .base import TASKS, get_task
from .caches import CacheFactories, check_recipes
from .executors import Job, make_executor
from .loading import check_model_name, load_pair
from .prompt import Prompt
from .store import FORMAT, ResultStore, cell_key

__all__ = ["Grid", "Cell", "run_grid", "load_pair", "check_model_name"]


@dataclass
class Grid:
    """What to run. ``recipes`` gets ``full`` prepended if missing; ``options`` are the task's options."""

    task: str
    model: str
    recipes: list[str]
    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: [0.5])
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, extra: CacheFactories | None = None) -> Grid:
        """A checked copy (full first, duplicates dropped, depth axis collapsed for depth-free tasks)."""
        if self.task not in TASKS:
            raise InvalidInput(f"unknown task {self.task!r}: known tasks are {', '.join(TASKS)}")
        check_model_name(self.model)
        for axis in ("lengths", "depths", "seeds"):
            if not getattr(self, axis):
                raise InvalidInput(f"the grid is empty: give at least one value in --{axis}")
        if not self.recipes:
            raise InvalidInput("the grid is empty: give at least one recipe in --recipes (full is always added)")
        bad = [d for d in self.depths if not (isinstance(d, (int, float)) and math.isfinite(d) and 0.0 <= d <= 1.0)]
        if bad:
            raise InvalidInput(f"depth {bad[0]} is outside [0, 1]: depths are fractions of the haystack (0 = start, 1 = end)")
        bad_len = [n for n in self.lengths if int(n) != n or n <= 0]
        if bad_len:
            raise InvalidInput(f"length {bad_len[0]} is not a positive whole number of tokens")
        task = get_task(self.task, **self.options)  # validates the options
        depths = sorted({round(float(d), 6) for d in self.depths}) if task.uses_depth else [0.0]
        return Grid(self.task, self.model, check_recipes(self.recipes, extra), sorted({int(n) for n in self.lengths}),
                    depths, sorted({int(s) for s in self.seeds}), task.options())

    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "task": self.task, "model": self.model, "options": self.options,
                "recipes": self.recipes, "lengths": self.lengths, "depths": self.depths, "seeds": self.seeds}


@dataclass(frozen=True)
class Cell:
    task: str
    model: str
    recipe: str
    length: int
    depth: float
    seed: int

    @property
    def key(self) -> tuple:
        return cell_key(self.__dict__)


def _max_context(model: Any) -> int:
    from ..generation import max_context

    return max_context(model)


def build_prompts(grid: Grid, tokenizer: Any, context: int) -> dict[tuple[int, float, int], Prompt]:
    """Every prompt of the grid, checked against the model's context (prompt + answer budget)."""
    task = get_task(grid.task, **grid.options)
    prompts = {}
    for length in grid.lengths:
        for depth in grid.depths:
            for seed in grid.seeds:
                p = task.build(tokenizer, length, depth, seed)
                need = len(p) + p.max_new_tokens
                if context and need > context:
                    raise ContextTooLong(
                        f"length {length} needs {need} tokens with its {p.max_new_tokens}-token answer budget, but "
                        f"{grid.model}'s maximum context is {context} tokens: drop lengths above {context - p.max_new_tokens}"
                    )
                prompts[(length, depth, seed)] = p
    return prompts


def plan_cells(grid: Grid) -> Iterator[Cell]:
    """Cells in run order: prompt-major (seed, length, depth), then recipe, so each prompt's cells are adjacent."""
    for seed in grid.seeds:
        for length in grid.lengths:
            for depth in grid.depths:
                for recipe in grid.recipes:
                    yield Cell(grid.task, grid.model, recipe, length, depth, seed)


def run_grid(
    grid: Grid,
    out: str | Path,
    *,
    ray: str | None = None,
    workers: int = 2,
    threads: int = 0,
    force: bool = False,
    factories: CacheFactories | None = None,
    pair: tuple[Any, Any] | None = None,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell of ``grid`` and append its record to ``<out>/results.jsonl``.

    Args:
        ray: None for the local executor; ``"local"`` to start a local Ray cluster; else a Ray address to join.
        workers: Ray actors (each loads the model once).
        threads: torch CPU threads per process (0: leave torch's default). On a shared or small machine 1 is often
            much faster than oversubscribed threads.
        factories: extra ``{recipe: fn(model) -> Cache}`` (tests); they take precedence over ``kvslim.make_cache``.
        pair: an already loaded ``(model, tokenizer)`` for the local executor (else loaded by name).

    Returns:
        ``{"ran": n, "skipped": n, "total": n, "out": path}``.
    """
    grid = grid.validate(factories)
    if threads < 0:
        raise InvalidInput(f"--threads must be 0 (torch's default) or more, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    store = ResultStore(out)
    store.claim(grid.config(), force=force, write=False)  # refuse a mismatch before loading anything
    model, tokenizer = pair if pair is not None else load_pair(grid.model)
    prompts = build_prompts(grid, tokenizer, _max_context(model))
    job = Job(grid.task, grid.options, grid.model, dict(factories or {}), threads)
    for recipe in grid.recipes:  # a recipe the model cannot take fails here, before any cell runs
        job.factory(recipe)(model)
    store.claim(grid.config(), force=force)
    store.repair()
    done = store.done()
    cells = list(plan_cells(grid))
    todo = [(c, prompts[(c.length, c.depth, c.seed)]) for c in cells if c.key not in done]
    executor = make_executor(ray, workers=workers, pair=(model, tokenizer))
    with _progress(progress, len(cells), len(cells) - len(todo), grid) as advance:
        for record in executor.run(job, todo):
            store.append(record)
            if on_record:
                on_record(record)
            advance(record)
    return {"ran": len(todo), "skipped": len(cells) - len(todo), "total": len(cells), "out": str(store.results)}


class _progress:
    """A rich progress bar with ETA on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int, skipped: int, grid: Grid) -> None:
        self.enabled, self.total, self.skipped, self.grid = enabled, total, skipped, grid
        self.bar: Any = None

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not self.enabled or self.total == self.skipped:
            return lambda _r: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.fields[last]}"), console=Console(stderr=True), transient=False)
        self.bar.start()
        tid = self.bar.add_task(f"{self.grid.task} {self.grid.model}", total=self.total - self.skipped, last="")

        def advance(rec: dict[str, Any]) -> None:
            ok = {True: "ok", False: "miss", None: f"{rec['score']:.3g}"}[rec.get("success")]
            self.bar.update(tid, advance=1, last=f"{rec['recipe']} {rec['length']} d={rec['depth']:g}: {ok}")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
