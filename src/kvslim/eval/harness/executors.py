"""Executors run cells and yield their records as they finish: in this process, or on Ray actors.

Both call the same :func:`run_cell` on the same prompts, so a grid gives the same records both ways (up to the
``seconds`` field and float noise from thread counts). The Ray executor starts a local cluster (``ray="local"``) or
joins one (``ray="ADDRESS"``); each actor loads the model once and runs one cell at a time. Ray is an optional
dependency (``pip install ray``), imported only here and only when asked for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InvalidInput
from ...hf_config import full16_nbytes
from ..tasks.base import get_task
from ..tasks.prompt import Prompt
from .caches import cache_factory, stored_recipe_key
from .engine import ONE_CALL, PrefillPlan

__all__ = ["Job", "run_cell", "make_record", "run_cells_batched", "LocalExecutor", "RayExecutor", "make_executor",
           "check_ray", "MAX_THREADS", "MAX_WORKERS"]

MAX_THREADS = 4096  # --threads above this is a typo, not a machine
MAX_WORKERS = 4096


@dataclass
class Job:
    """Everything a worker needs besides the cells: the task, its options, the model name, extra cache factories,
    each recipe's prefill plan (decided once per recipe by :func:`kvslim.eval.harness.runner.run_grid`) and its
    parsed :class:`~kvslim.cache.recipe.Recipe` (parsed once, by the grid: ``make_cache`` takes it as it is)."""

    task: str
    options: dict[str, Any]
    model: str
    factories: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    threads: int = 0  # torch threads in each worker (0: the worker's default)
    plans: dict[str, PrefillPlan] = field(default_factory=dict)  # recipe -> its plan (absent: one call, not shared)
    recipes: dict[str, Any] = field(default_factory=dict)  # recipe -> its Recipe (absent: full, a test factory)

    def factory(self, recipe: str) -> Callable[[Any], Any]:
        return cache_factory(self.recipes.get(recipe, recipe), self.factories)

    def plan(self, recipe: str) -> PrefillPlan:
        """How ``recipe``'s cells prefill (:class:`~kvslim.eval.harness.engine.PrefillPlan`)."""
        return self.plans.get(recipe, ONE_CALL)


@contextmanager
def closing_caches(make: Callable[[Any], Any], model: Any) -> Iterator[Callable[[], Any]]:
    """``fresh()`` -> a new cache of ``make``; every cache made is closed when the block ends (a cell's end), so a
    tiered cache's cold files and temporary folder go with its cell, not with the process (``store=disk``)."""
    made: list[Any] = []

    def fresh() -> Any:
        made.append(make(model))
        return made[-1]

    try:
        yield fresh
    finally:
        for cache in made:
            if callable(getattr(cache, "close", None)):
                cache.close()


def run_cell(job: Job, task: Any, model: Any, tokenizer: Any, cell: Any, prompt: Prompt) -> dict[str, Any]:
    """Run one cell and return its record (see :mod:`kvslim.eval.harness.store` for the fields); its caches are closed
    when it ends."""
    plan = job.plan(cell.recipe)
    t0 = time.perf_counter()
    with closing_caches(job.factory(cell.recipe), model) as fresh:
        res = task.run(model, tokenizer, prompt, fresh, plan)
    return make_record(cell, prompt, res, time.perf_counter() - t0, model, plan.chunk)


def make_record(cell: Any, prompt: Prompt, res: dict[str, Any], seconds: float, model: Any,
                prefill_chunk: int = 0) -> dict[str, Any]:
    """A cell's record from the task's result (see :mod:`kvslim.eval.harness.store` for the fields); a chunked prefill
    is noted as ``prefill_chunk``. ``recipe`` is the recipe's identity (:func:`kvslim.cache.recipe.identity`); where its
    bytes lived (``store=disk``, ``dir=``), when not the default, is noted as ``placement``."""
    full16 = full16_nbytes(model.config, len(prompt))
    rec: dict[str, Any] = {
        "task": cell.task, "model": cell.model, "recipe": stored_recipe_key(cell.recipe), "length": cell.length,
        "depth": cell.depth, "seed": cell.seed,
        "success": res.pop("success"), "score": res.pop("score"),
        "kv_bytes": int(res.pop("kv_bytes")), "kv_bytes_full16": full16,
        "prompt_tokens": len(prompt), "seconds": round(seconds, 3),
        "answer": res.pop("answer"), "expected": prompt.answers,
        "prompt_hash": prompt.hash, "needle_positions": prompt.needle_positions,
    }
    rec.update(res)  # task extras: logprob, retrieved, ppl, ppl_full
    if rec["recipe"] != cell.recipe:
        from ...cache.recipe import placement

        where = placement(cell.recipe)
        if where:
            rec["placement"] = where
    if prefill_chunk:
        rec["prefill_chunk"] = int(prefill_chunk)
    return rec


class LocalExecutor:
    """Runs cells one after another in this process, with an already loaded model; with ``batch`` > 1 the cells of
    one recipe and length run ``batch`` at a time (:mod:`kvslim.eval.harness.batch`) when the task can."""

    def __init__(self, pair: tuple[Any, Any], batch: int = 1) -> None:
        if batch < 1:
            raise InvalidInput(f"--batch must be at least 1, got {batch}")
        self.model, self.tokenizer = pair
        self.batch = batch

    def run(self, job: Job, todo: list[tuple[Any, Prompt]]) -> Iterator[dict[str, Any]]:
        task = get_task(job.task, **job.options)
        if self.batch == 1 or not task.batchable:
            for cell, prompt in todo:
                yield run_cell(job, task, self.model, self.tokenizer, cell, prompt)
            return
        from .batch import batches

        for group in batches(todo, self.batch):
            if len(group) == 1:
                yield run_cell(job, task, self.model, self.tokenizer, *group[0])
            else:
                yield from run_cells_batched(job, task, self.model, self.tokenizer, group)


def run_cells_batched(job: Job, task: Any, model: Any, tokenizer: Any, group: list[tuple[Any, Prompt]]
                      ) -> list[dict[str, Any]]:
    """Run cells of one recipe and one length together; each record's ``seconds`` is the batch's time / B."""
    plan = job.plan(group[0][0].recipe)
    t0 = time.perf_counter()
    with closing_caches(job.factory(group[0][0].recipe), model) as fresh:
        results = task.run_batch(model, tokenizer, [p for _, p in group], fresh, plan)
    seconds = (time.perf_counter() - t0) / len(group)
    return [make_record(c, p, r, seconds, model, plan.chunk) for (c, p), r in zip(group, results, strict=True)]


class _Worker:
    """A Ray actor body: loads the model once, then runs cells."""

    def __init__(self, job: Job) -> None:
        from .loading import load_pair

        if job.threads:
            import torch

            torch.set_num_threads(job.threads)
        self.job = job
        self.model, self.tokenizer = load_pair(job.model)
        self.task = get_task(job.task, **job.options)

    def run(self, item: tuple[Any, Prompt]) -> dict[str, Any]:
        cell, prompt = item
        return run_cell(self.job, self.task, self.model, self.tokenizer, cell, prompt)


def check_ray(address: str, workers: int, timeout: float = 3.0) -> None:
    """Refuse, in one line and within ``timeout`` seconds, what would make Ray fail after the model loaded: ray not
    installed, ``workers`` out of range, an address that is not ``HOST:PORT`` / ``ray://HOST:PORT`` or that nothing
    listens on (``local`` and ``auto`` are left to Ray)."""
    import socket

    from ...units import check_int

    check_int(workers, "--workers", maximum=MAX_WORKERS)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise InvalidInput("--ray needs the ray package: pip install ray (or install kvslim[dev])") from None
    if address in ("local", "auto"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--ray {address!r} is not a Ray address: give HOST:PORT (e.g. 10.0.0.5:6379) or "
                           "ray://HOST:PORT, or a bare --ray for a local cluster")  # fmt: skip
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise InvalidInput(f"cannot reach a Ray cluster at {address} ({reason}): start one there with `ray start "
                           "--head`, or use a bare --ray for a local cluster") from None  # fmt: skip


class RayExecutor:
    """Runs cells on ``workers`` Ray actors; ``address`` "local" starts a private local cluster, else joins it."""

    def __init__(self, address: str, workers: int = 2) -> None:
        if workers < 1:
            raise InvalidInput(f"--workers must be at least 1, got {workers}")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InvalidInput("--ray needs the ray package: pip install ray (or install kvslim[dev])") from None
        self.address, self.workers = address, workers

    def run(self, job: Job, todo: list[tuple[Any, Prompt]]) -> Iterator[dict[str, Any]]:
        import ray
        from ray.util import ActorPool

        if not todo:
            return
        src = str(Path(__file__).resolve().parents[2])  # the folder holding this kvslim package
        env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
        started = not ray.is_initialized()
        if started:
            kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                                  "log_to_driver": False, "configure_logging": False}
            try:
                if self.address == "local":
                    ray.init(num_cpus=self.workers, **kw)
                else:
                    ray.init(address=self.address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise InvalidInput(f"could not start or join Ray at {self.address}: {first}") from None
        try:
            actor = ray.remote(num_cpus=1)(_Worker)
            pool = ActorPool([actor.remote(job) for _ in range(min(self.workers, len(todo)))])
            yield from pool.map_unordered(lambda a, item: a.run.remote(item), todo)
        finally:
            if started:
                ray.shutdown()


def make_executor(ray: str | None, *, workers: int, pair: tuple[Any, Any], batch: int = 1) -> LocalExecutor | RayExecutor:
    return LocalExecutor(pair, batch) if ray is None else RayExecutor(ray, workers)
