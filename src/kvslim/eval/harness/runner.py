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

from ...errors import ContextTooLong, InvalidInput
from ...paths import check_output_dir
from ...units import check_int
from ..tasks.base import TASKS, get_task
from ..tasks.prompt import Prompt
from .caches import (
    CacheFactories,
    check_recipes,
    chunks_invariantly,
    prefill_plan,
    recipe_key,
    run_recipe,
    stored_recipe_key,
)
from .executors import MAX_THREADS, Job, check_ray, make_executor
from .loading import check_model_name, load_pair
from .share import Shared
from .store import FORMAT, ResultStore, cell_key

__all__ = ["Grid", "Cell", "run_grid", "load_pair", "check_model_name", "check_options", "recipe_key", "build_prompt"]


@dataclass
class Grid:
    """What to run. ``recipes`` gets ``full`` prepended if missing; ``options`` are the task's options. Recipes that
    compute the same (:func:`kvslim.cache.recipe.identity`: they differ only in where bytes live, ``store=``/``dir=``)
    run once, the first one given. ``recipes`` may hold names or parsed :class:`~kvslim.cache.recipe.Recipe` s; the
    validated grid holds the canonical names, and ``parsed`` maps each name run to its recipe (parsed once)."""

    task: str
    model: str
    recipes: list[Any]
    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: [0.5])
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)
    parsed: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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
        bad_len = [n for n in self.lengths if not _whole(n) or n <= 0]
        if bad_len:
            raise InvalidInput(f"length {bad_len[0]} is not a positive whole number of tokens")
        for n in self.lengths:
            check_int(int(n), "a length")
        bad_seed = [s for s in self.seeds if not _whole(s)]
        if bad_seed:
            raise InvalidInput(f"seed {bad_seed[0]!r} is not a whole number")
        for s in self.seeds:
            check_int(int(s), "a seed", minimum=0)
        check_options(self.task, self.options)
        task = get_task(self.task, **self.options)  # validates the options
        depths = sorted({round(float(d), 6) for d in self.depths}) if task.uses_depth else [0.0]
        runs: dict[str, str] = {}  # identity -> the recipe run (placement included); one computation runs once
        parsed: dict[str, Any] = {}  # the recipe run -> its Recipe (full and test factories: none)
        for r in check_recipes(self.recipes, extra):
            key = recipe_key(r, extra)
            if key not in runs:  # the first spelling of a computation runs (full: always the DynamicCache, first)
                runs[key] = run_recipe(r, extra)
                if not isinstance(r, str):
                    parsed[runs[key]] = r
        recipes = list(runs.values())
        return Grid(self.task, self.model, recipes, sorted({int(n) for n in self.lengths}),
                    depths, sorted({int(s) for s in self.seeds}), task.options(), parsed)

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
        """The stored cell's key: its recipe's identity (placement parameters left out), as records hold it."""
        return cell_key({**self.__dict__, "recipe": stored_recipe_key(self.recipe)})


def _whole(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and int(v) == v


_OPTION_FLAGS = {"k": "--needles", "max_new_tokens": "--max-new-tokens", "eval_tokens": "--eval-tokens", "chat": "--chat"}


def check_options(task: str, options: dict[str, Any]) -> None:
    """Range-check a task's options before anything is written: whole-number options are >= 1 (>= 0 where the
    task's default is 0, meaning "automatic") and within int64; flags are true, false or None."""
    import dataclasses

    defaults = {f.name: getattr(get_task(task), f.name) for f in dataclasses.fields(get_task(task)) if not f.name.startswith("_")}
    for name, value in options.items():
        if name not in defaults or (value is None and defaults[name] is None):
            continue  # unknown names are refused by get_task; None is a value only where it is the default
        what = f"{_OPTION_FLAGS.get(name, name)} ({task})"
        default = defaults[name]
        if default is None or isinstance(default, bool):
            if value not in (True, False):
                raise InvalidInput(f"{what} must be true or false, got {value!r}")
        elif isinstance(default, int):
            check_int(value, what, minimum=0 if default == 0 else 1)


def _max_context(model: Any) -> int:
    from ...generation import max_context

    return max_context(model)


_TOO_SHORT = "use lengths of at least "


def _named_length(e: InvalidInput) -> int | None:
    head, sep, tail = str(e).rpartition(_TOO_SHORT)
    return int(tail) if sep and tail.isdigit() else None


def build_prompt(task: Any, tokenizer: Any, length: int, depth: float, seed: int) -> Prompt:
    """``task.build``; a "too short" refusal names a length at which this cell's prompt does build. The values a
    prompt draws depend on its length, so the fixed text measured at the refused length can be longer at the length
    it names: retry there until one fits (each retry's length is larger, and the fixed text is bounded)."""
    try:
        return task.build(tokenizer, length, depth, seed)
    except InvalidInput as first:
        need = _named_length(first)
        if need is None:
            raise
        for _ in range(64):
            try:
                task.build(tokenizer, need, depth, seed)
                break
            except InvalidInput as e:
                more = _named_length(e)
                if more is None or more <= need:
                    raise first from None
                need = more
        msg = str(first)
        raise InvalidInput(msg[: msg.rindex(_TOO_SHORT)] + f"{_TOO_SHORT}{need}") from None


def build_prompts(grid: Grid, tokenizer: Any, context: int) -> dict[tuple[int, float, int], Prompt]:
    """Every prompt of the grid, checked against the model's context (prompt + answer budget)."""
    task = get_task(grid.task, **grid.options)
    budget = max([v for k, v in grid.options.items() if k in ("max_new_tokens", "eval_tokens") and v] or [0])
    if context and max(grid.lengths) + budget > context:  # refused before building a prompt of that size
        raise ContextTooLong(
            f"length {max(grid.lengths)} plus a {budget}-token answer budget does not fit: {grid.model}'s maximum "
            f"context is {context} tokens; use shorter lengths or a smaller budget"
        )
    prompts = {}
    for length in grid.lengths:
        for depth in grid.depths:
            for seed in grid.seeds:
                p = build_prompt(task, tokenizer, length, depth, seed)
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
    warn: Callable[[str], None] | None = None,
    batch: int = 1,
    prefill_chunk: int = 0,
    chunk_where_invariant: bool = False,
    share_prefill: bool = False,
) -> dict[str, Any]:
    """Run every unfinished cell of ``grid`` and append its record to ``<out>/results.jsonl``.

    Args:
        ray: None for the local executor; ``"local"`` to start a local Ray cluster; else a Ray address to join.
        workers: Ray actors (each loads the model once).
        threads: torch CPU threads per process (0: leave torch's default). On a shared or small machine 1 is often
            much faster than oversubscribed threads.
        factories: extra ``{recipe: fn(model) -> Cache}`` (tests); they take precedence over ``kvslim.make_cache``.
        pair: an already loaded ``(model, tokenizer)`` for the local executor (else loaded by name).
        warn: receives one line per problem found in the store (bad lines, duplicate cells); default: a
            ``KvslimWarning``.

        batch: the local executor runs up to this many cells of one recipe and length together (batched passes,
            the same records; :mod:`kvslim.eval.harness.batch`); the Ray executor runs one cell per call.
        prefill_chunk: feed each prompt in calls of at most this many tokens (0: one call); only for recipes whose
            cache is chunk-invariant (``full``, and :func:`kvslim.cache.recipe.chunk_invariant`), where it changes
            nothing but float rounding; an eviction method would compress after every chunk. Much faster on long
            prompts for models with sliding-window layers; each record notes it as ``prefill_chunk``. See
            :class:`kvslim.eval.harness.engine.PrefillPlan`.
        chunk_where_invariant: with ``prefill_chunk``, chunk the recipes that are chunk-invariant and prefill the
            others (eviction methods, KIVI) in one call, instead of refusing the grid.
        share_prefill: with the local executor, a question-agnostic prompt's context is run through the model once
            for all its eviction recipes and fed to each from the recording, every layer's output checked equal bit
            for bit (:mod:`kvslim.eval.harness.share`); the records are the same, those fed so say ``shared_prefill`` (and
            their ``seconds`` are the replay's, not a prefill's).

    Each recipe's :class:`~kvslim.eval.harness.engine.PrefillPlan` (its chunk, and the shared pool where its
    cache declares ``shares_context_prefill``) is decided here, once, and travels in the ``Job`` to every cell.

    Raises ``InvalidInput`` before anything is written for a bad grid, option, output folder or Ray address, and
    when another run holds the folder.

    Returns:
        ``{"ran": n, "skipped": n, "total": n, "out": path}``.
    """
    grid = grid.validate(factories)
    check_int(threads, "--threads", minimum=0, maximum=MAX_THREADS)
    check_prefill_chunk(prefill_chunk, grid.recipes, factories, chunk_where_invariant, grid.parsed)
    if ray is not None:
        check_ray(ray, workers)  # ray installed, --workers in range, the address reachable: before anything loads
    say = warn or _warn
    store = ResultStore(check_output_dir(out), recipe_key=stored_recipe_key)
    store.claim(grid.config(), force=force, write=False)  # refuse a mismatch before loading anything
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer = pair if pair is not None else load_pair(grid.model)
    prompts = build_prompts(grid, tokenizer, _max_context(model))
    job = Job(grid.task, grid.options, grid.model, dict(factories or {}), threads, recipes=dict(grid.parsed))
    pool = Shared() if share_prefill and ray is None and batch == 1 else None
    for recipe in grid.recipes:  # a recipe the model cannot take fails here, before any cell runs
        job.plans[recipe] = prefill_plan(job.recipes.get(recipe, recipe), job.factory(recipe)(model), prefill_chunk,
                                         chunk_where_invariant, factories, pool)
    try:
        with store.writing(grid.config(), say, force=force) as done:  # one writer per folder: a second run is refused
            cells = list(plan_cells(grid))
            todo = [(c, prompts[(c.length, c.depth, c.seed)]) for c in cells if c.key not in done]
            executor = make_executor(ray, workers=workers, pair=(model, tokenizer), batch=batch)
            with _progress(progress, len(cells), len(cells) - len(todo), grid) as advance:
                for record in executor.run(job, todo):
                    store.append(record)
                    if on_record:
                        on_record(record)
                    advance(record)
    finally:
        if pool is not None:
            pool.clear()  # the last recording's memory
    return {"ran": len(todo), "skipped": len(cells) - len(todo), "total": len(cells), "out": str(store.results)}


def check_prefill_chunk(chunk: int, recipes: list[str], extra: CacheFactories | None = None,
                        where_invariant: bool = False, parsed: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Refuse a bad ``--prefill-chunk``: not a whole number >= 0, or > 0 with a recipe whose cache is not
    chunk-invariant (:func:`kvslim.cache.recipe.chunk_invariant`: an eviction method compresses after every call, KIVI
    groups tokens, recall's dense prefill takes a one-token call for a decode step), or with a test factory,
    whose invariance is unknown (``where_invariant``: those run in one
    call instead). ``parsed``: the recipes' parsed forms by name (:attr:`Grid.parsed`)."""
    check_int(chunk, "--prefill-chunk", minimum=0)
    if not chunk or where_invariant:
        return
    for r in recipes:
        p = (parsed or {}).get(r, r)
        if chunk == 1 and chunks_invariantly(p, extra) and not chunks_invariantly(p, extra, chunk):
            raise InvalidInput(
                f"--prefill-chunk 1 makes every prefill call one token, which {r!r}'s dense prefill treats as a decode "
                "step (it selects blocks), so it would not compute what one call does: use --prefill-chunk 2 or more"
            )
        if not chunks_invariantly(p, extra, chunk):
            raise InvalidInput(
                f"--prefill-chunk {chunk} needs recipes whose cache gives the same results in one call or in chunks; "
                f"{r!r} does not (it compresses or groups tokens per call, so chunks would be a different "
                "experiment): run it without --prefill-chunk"
            )


def _warn(message: str) -> None:
    import warnings

    from ...errors import KvslimWarning

    warnings.warn(message, KvslimWarning, stacklevel=3)


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
