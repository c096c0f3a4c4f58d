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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from ..hf_config import full16_nbytes
from .base import get_task
from .caches import cache_factory
from .prompt import Prompt

__all__ = ["Job", "run_cell", "LocalExecutor", "RayExecutor", "make_executor"]


@dataclass
class Job:
    """Everything a worker needs besides the cells: the task, its options, the model name, extra cache factories."""

    task: str
    options: dict[str, Any]
    model: str
    factories: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    threads: int = 0  # torch threads in each worker (0: the worker's default)

    def factory(self, recipe: str) -> Callable[[Any], Any]:
        return cache_factory(recipe, self.factories)


def run_cell(job: Job, task: Any, model: Any, tokenizer: Any, cell: Any, prompt: Prompt) -> dict[str, Any]:
    """Run one cell and return its record (see :mod:`kvslim.eval.store` for the fields)."""
    make = job.factory(cell.recipe)

    def fresh() -> Any:
        return make(model)

    t0 = time.perf_counter()
    res = task.run(model, tokenizer, prompt, fresh, cell.recipe)
    seconds = time.perf_counter() - t0
    full16 = full16_nbytes(model.config, len(prompt))
    rec: dict[str, Any] = {
        "task": cell.task, "model": cell.model, "recipe": cell.recipe, "length": cell.length,
        "depth": cell.depth, "seed": cell.seed,
        "success": res.pop("success"), "score": res.pop("score"),
        "kv_bytes": int(res.pop("kv_bytes")), "kv_bytes_full16": full16,
        "prompt_tokens": len(prompt), "seconds": round(seconds, 3),
        "answer": res.pop("answer"), "expected": prompt.answers,
        "prompt_hash": prompt.hash, "needle_positions": prompt.needle_positions,
    }
    rec.update(res)  # task extras: logprob, retrieved, ppl, ppl_full
    return rec


class LocalExecutor:
    """Runs cells one after another in this process, with an already loaded model."""

    def __init__(self, pair: tuple[Any, Any]) -> None:
        self.model, self.tokenizer = pair

    def run(self, job: Job, todo: list[tuple[Any, Prompt]]) -> Iterator[dict[str, Any]]:
        task = get_task(job.task, **job.options)
        for cell, prompt in todo:
            yield run_cell(job, task, self.model, self.tokenizer, cell, prompt)


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
            if self.address == "local":
                ray.init(num_cpus=self.workers, **kw)
            else:
                ray.init(address=self.address, **kw)
        try:
            actor = ray.remote(num_cpus=1)(_Worker)
            pool = ActorPool([actor.remote(job) for _ in range(min(self.workers, len(todo)))])
            yield from pool.map_unordered(lambda a, item: a.run.remote(item), todo)
        finally:
            if started:
                ray.shutdown()


def make_executor(ray: str | None, *, workers: int, pair: tuple[Any, Any]) -> LocalExecutor | RayExecutor:
    return LocalExecutor(pair) if ray is None else RayExecutor(ray, workers)
