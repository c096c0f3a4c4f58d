"""The campaign runner: a list of grid slices run in order into their stores, under a time budget, resumable.

A campaign is what the baselines (``bench/niah_baseline.py``, ``bench/ruler_baseline.py``) and ``kvslim niah
--suite`` (:func:`kvslim.eval.harness.suite.run_suite`) run: many grids, each into its own resumable store.
:func:`run_campaign` runs each :class:`Slice` (a grid and its folder) with
:func:`~kvslim.eval.harness.runner.run_grid`, in the order given (the caller's order is the plan: cheapest first,
model by model), and

* resumes: each store skips its finished cells (rerunning a campaign runs only what is missing);
* keeps one model in memory: consecutive slices of one model share it, the next model is loaded when the first
  slice of it runs (``pair=`` gives one model for every slice; with ``ray=`` the workers load their own);
* stops cleanly when the budget runs out: no cell starts after ``budget_s`` seconds (the cell that crosses it
  finishes and is stored), and :attr:`CampaignResult.left` says what is left, slice by slice;
* with ``busy="later"``, a slice whose folder another live run holds (:class:`~kvslim.eval.harness.store.StoreBusy`)
  goes to the end of its model's slices and is retried once the rest is done or busy (two processes may share one
  campaign, one core each); ``busy="raise"`` (the default) raises it;
* says what it does through ``say`` (one line per slice; ``None``: silent), beside ``run_grid``'s progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InvalidInput
from .caches import stored_recipe_key
from .runner import Grid, plan_cells, run_grid
from .store import ResultStore, StoreBusy

__all__ = ["Slice", "Left", "CampaignResult", "run_campaign", "pending_cells"]

BUSY = ("raise", "later")


@dataclass(frozen=True)
class Slice:
    """One grid of a campaign and the folder of its store; ``run`` holds ``run_grid`` keywords for this slice only
    (over the campaign's: e.g. a ``prefill_chunk`` for one model); ``label`` names it in progress lines."""

    grid: Grid
    out: Path
    run: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        """``label``, else ``<model> <task> <lengths> tokens``."""
        if self.label:
            return self.label
        return f"{self.grid.model} {self.grid.task} {','.join(map(str, self.grid.lengths))} tokens"


@dataclass(frozen=True)
class Left:
    """A slice not finished when the campaign stopped: ``cells`` of its ``total`` not in its store (both None when
    its grid no longer validates)."""

    slice: Slice
    cells: int | None
    total: int | None


@dataclass
class CampaignResult:
    """What ran: ``ran``: cells run and stored by this call (a slice the budget cut short included); ``skipped`` /
    ``total``: summed over the slices that ran to their end; ``done``: those slices with their ``run_grid`` result,
    in run order; ``stopped``: the budget ran out; ``left``: the slices with cells left then (the one cut short and
    those not started, in plan order)."""

    ran: int = 0
    skipped: int = 0
    total: int = 0
    done: list[tuple[Slice, dict[str, Any]]] = field(default_factory=list)
    stopped: bool = False
    left: list[Left] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ran": self.ran, "skipped": self.skipped, "total": self.total, "stopped": self.stopped,
                "slices": [{"slice": s.name, **res} for s, res in self.done],
                "left": [{"slice": x.slice.name, "out": str(x.slice.out), "cells": x.cells, "total": x.total}
                         for x in self.left]}  # fmt: skip


class _OutOfTime(Exception):
    pass


def pending_cells(s: Slice, factories: Any = None) -> tuple[int, int]:
    """``(cells not in the slice's store, cells of its grid)``, read from the store without loading a model."""
    grid = s.grid.validate(factories)
    done = ResultStore(s.out, recipe_key=stored_recipe_key).done()
    cells = list(plan_cells(grid))
    return sum(c.key not in done for c in cells), len(cells)


def _groups(slices: Sequence[Slice]) -> Iterator[list[Slice]]:
    """Runs of consecutive slices of one model (one model loaded for each run)."""
    group: list[Slice] = []
    for s in slices:
        if group and s.grid.model != group[0].grid.model:
            yield group
            group = []
        group.append(s)
    if group:
        yield group


def run_campaign(
    slices: Sequence[Slice],
    *,
    budget_s: float | None = None,
    busy: str = "raise",
    wait_s: float = 30.0,
    say: Callable[[str], None] | None = None,
    load: Callable[[str], tuple[Any, Any]] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    **run_kwargs: Any,
) -> CampaignResult:
    """Run ``slices`` in order, each with ``run_grid(slice.grid, slice.out, **run_kwargs, **slice.run)``.

    Args:
        budget_s: no cell starts after this many seconds from the call (None or 0: no budget). Checked before each
            slice and after each stored cell; what is left is in the result's ``left`` (and said).
        busy: ``"raise"``: a folder another live run holds raises :class:`~kvslim.eval.harness.store.StoreBusy`;
            ``"later"``: the slice is retried after the rest of its model's slices, waiting ``wait_s`` seconds
            whenever every remaining one of them is busy.
        say: receives the progress lines (None: silent).
        load: ``name -> (model, tokenizer)`` (default :func:`kvslim.eval.harness.runner.load_pair`); called once
            per run of consecutive slices of one model, the previous model dropped first. Not called when
            ``run_kwargs`` hold a ``pair`` (every slice uses it) or a ``ray`` address (workers load their own).
        clock, sleep: the time source and the wait (tests).
        run_kwargs: for :func:`~kvslim.eval.harness.runner.run_grid` (``threads``, ``progress``, ``factories``,
            ``on_record``, ``prefill_chunk``, ...).

    Returns:
        A :class:`CampaignResult`.
    """
    if busy not in BUSY:
        raise InvalidInput(f"busy must be one of {', '.join(BUSY)}, got {busy!r}")
    out = CampaignResult()
    tell = say or (lambda _line: None)
    deadline = clock() + budget_s if budget_s else None
    minutes = f"{budget_s / 60:g}" if budget_s else ""
    fixed = run_kwargs.pop("pair", None)
    preload = fixed is None and run_kwargs.get("ray") is None
    user_on_record = run_kwargs.pop("on_record", None)

    def over() -> bool:
        return deadline is not None and clock() > deadline

    def stop(rest: list[Slice]) -> CampaignResult:
        tell(f"   budget of {minutes} min spent: stopping")
        out.stopped = True
        out.left = _left(rest, run_kwargs)
        for x in out.left:
            what = f"{x.cells} of {x.total} cells" if x.cells is not None else "its grid no longer validates"
            tell(f"   left: {x.slice.name} ({what}) -> {x.slice.out}")
        return out

    groups = list(_groups(slices))
    n_slices = len(slices)
    for gi, group in enumerate(groups):
        later = [s for g in groups[gi + 1:] for s in g]
        if over():
            return stop([*group, *later])
        pair = fixed  # with preload, the last group's model was dropped (del below) before this one loads
        if preload:
            if load is None:
                from .runner import load_pair  # looked up at call time (tests replace it)

                pair = load_pair(group[0].grid.model)
            else:
                pair = load(group[0].grid.model)
        queue = list(group)
        busy_round = 0
        while queue:
            if over():
                return stop([*queue, *later])
            s = queue.pop(0)
            kwargs = {**run_kwargs, **s.run}
            hook = kwargs.pop("on_record", user_on_record)
            stored = [0]  # cells this slice has stored so far

            def on_record(rec: dict[str, Any], hook: Any = hook, stored: list[int] = stored) -> None:
                stored[0] += 1
                if hook is not None:
                    hook(rec)
                if over():
                    raise _OutOfTime

            tell(f"== {s.name} -> {s.out}" + (f"  [{len(out.done) + 1}/{n_slices}]" if n_slices > 1 else ""))
            try:
                res = run_grid(s.grid, s.out, pair=pair, on_record=on_record, **kwargs)
            except StoreBusy as e:
                if busy == "raise":
                    raise
                tell(f"   busy ({e}): later")
                queue.append(s)
                busy_round += 1
                if busy_round >= len(queue):  # every remaining slice of this model is busy: wait for the other run
                    if over():
                        return stop([*queue, *later])
                    sleep(wait_s)
                    busy_round = 0
                continue
            except _OutOfTime:
                out.ran += stored[0]
                return stop([s, *queue, *later])
            busy_round = 0
            tell(f"   {res['ran']} run, {res['skipped']} done before")
            out.done.append((s, res))
            out.ran += res["ran"]
            out.skipped += res["skipped"]
            out.total += res["total"]
        del pair
    return out


def _left(rest: list[Slice], run_kwargs: dict[str, Any]) -> list[Left]:
    """The slices of ``rest`` with cells not in their stores (a grid that no longer validates counts as left)."""
    left = []
    for s in rest:
        try:
            cells, total = pending_cells(s, {**run_kwargs, **s.run}.get("factories"))
        except InvalidInput:
            left.append(Left(s, None, None))
            continue
        if cells:
            left.append(Left(s, cells, total))
    return left
