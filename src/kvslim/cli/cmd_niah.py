"""``kvslim niah``: run a needle-in-a-haystack grid (model x recipes x lengths x depths x seeds) into a folder."""

from __future__ import annotations

import typer

from ._common import console, one_line_errors, print_json, warn_line

RAY_LOCAL = "local"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def expand_bare_ray(argv: list[str]) -> list[str]:
    """``--ray`` given without an address means "start a local cluster": insert ``local`` after a bare ``--ray``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(RAY_LOCAL)
    return out


def parse_list(text: str, kind: type, what: str) -> list:
    """``"1000,2k,1M"`` -> ``[1000, 2048, 1048576]`` for ``int`` (token counts: k = 1024, M = 2^20, exact, within
    int64; see :mod:`kvslim.units`), plain numbers for ``float``; bad items raise InvalidInput."""
    from ..errors import InvalidInput
    from ..units import check_int, parse_count, parse_exact

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InvalidInput(f"the grid is empty: --{what} has no values")
    if kind is int and what == "lengths":
        return [parse_count(t, f"--{what}") for t in items]
    if kind is int:
        return [check_int(parse_exact(t, {"": 1}, f"--{what}", "0, 1, 2"), f"--{what}", minimum=0) for t in items]
    out = []
    for t in items:
        try:
            out.append(kind(t))
        except ValueError:
            raise InvalidInput(f"--{what}: {t!r} is not a number") from None
    return out


def parse_opts(items: list[str]) -> dict:
    """``["haystack=noise", "n_keys=4", "example=false"]`` -> options (ints, floats, booleans, else strings); a key
    given twice is refused (the last would silently win)."""
    from ..errors import InvalidInput

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--opt {item!r}: give KEY=VALUE, e.g. --opt haystack=noise")
        value: object = raw.strip()
        low = raw.strip().lower()
        if low in ("true", "false"):
            value = low == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        if key.strip() in out:
            raise InvalidInput(f"--opt {key.strip()} is given twice ({out[key.strip()]!r} and {value!r}): give it once")
        out[key.strip()] = value
    return out


def check_suite_flags(suite: str | None, task: str | None, suite_tasks: str | None) -> list[str] | None:
    """Refuse flags that would be silently ignored: ``--suite-tasks`` without ``--suite``, ``--task`` with it, an
    empty ``--suite-tasks`` (which would run every task). Returns the ``--suite-tasks`` list (None: every task)."""
    from ..errors import InvalidInput

    if suite is None:
        if suite_tasks is not None:
            raise InvalidInput("--suite-tasks picks tasks of a --suite; without --suite give one task with --task")
        return None
    if task is not None:
        raise InvalidInput(f"--task {task} and --suite {suite} are exclusive: a suite runs its own tasks (pick some "
                           "with --suite-tasks)")
    if suite_tasks is None:
        return None
    tasks = [t.strip() for t in suite_tasks.split(",") if t.strip()]
    if not tasks:
        raise InvalidInput(f"--suite-tasks {suite_tasks!r} names no task: give some, e.g. --suite-tasks niah_single_1,vt,"
                           " or leave the flag out to run every task")
    return tasks


def check_depths(task: str, depths: str | None) -> None:
    """Refuse ``--depths`` for a task without a needle depth (cwe, fwe, fidelity): it would run one cell recorded
    as depth 0."""
    from ..errors import InvalidInput
    from ..eval.tasks.base import TASKS, get_task

    if depths is not None and task in TASKS and not get_task(task).uses_depth:
        raise InvalidInput(f"--depths does not apply to {task}: it has no needle depth (every cell is recorded at "
                           "depth 0); leave --depths out and give more --seeds for more cells")


ENGINES = ("transformers", "vllm")


def check_engine(engine: str, *, suite: str | None, ray: str | None, batch: int, prefill_chunk: int,
                 vllm_python: str | None, vllm_kv_mib: int | None) -> None:
    """Refuse an unknown ``--engine`` and flags the chosen engine would not honour (before anything runs)."""
    from ..errors import InvalidInput

    if engine not in ENGINES:
        raise InvalidInput(f"--engine {engine!r}: choose transformers or vllm")
    if engine == "transformers":
        for flag, value in (("--vllm-python", vllm_python), ("--vllm-kv-mib", vllm_kv_mib)):
            if value is not None:
                raise InvalidInput(f"{flag} applies to --engine vllm only")
        return
    for flag, given in (("--suite", suite is not None), ("--ray", ray is not None), ("--batch", batch != 1),
                        ("--prefill-chunk", prefill_chunk != 0)):
        if given:
            raise InvalidInput(f"{flag} is not available with --engine vllm (vLLM batches and chunks prefills "
                               "itself; one engine per recipe runs its cells): leave it out")


def check_engine_recipes(engine: str, names: list[str]) -> None:
    """A vLLM recipe needs ``--engine vllm`` (the other way round is checked by the vLLM runner)."""
    from ..errors import InvalidInput
    from ..eval.harness.vllm_engine import is_vllm_recipe

    if engine != "vllm":
        bad = [n for n in names if is_vllm_recipe(n)]
        if bad:
            raise InvalidInput(f"{bad[0].strip()!r} is a vLLM recipe: add --engine vllm (vLLM recipes and "
                               "transformers recipes run as separate grids, into the same --out if you like)")


def check_vllm_format(fmt: str, head_size: int) -> None:
    """Refuse a kvslim format the vLLM plugin cannot serve at ``head_size`` with its one-line message
    (:mod:`kvslim.vllm.layout`: unknown names, KIVI, head sizes the codec cannot take)."""
    from ..vllm.layout import make_codec
    from ..vllm.recall_spec import is_recall, parse_recall

    if is_recall(fmt):  # tiered recall: its recipe, and the codecs of its summaries and cold rows at this head size
        rf = parse_recall(fmt)
        for codec in {rf.codec, rf.cold} - {"none"}:
            make_codec(codec, head_size)
        return
    make_codec(fmt, head_size)  # raises the plugin's one-line refusal naming the format


def register(app: typer.Typer) -> None:
    @app.command("niah")
    @one_line_errors
    def niah_cmd(
        out: str = typer.Option(..., "--out", "-o", help="Results folder (results.jsonl, config.json); reruns resume it."),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Embedded model name, local HF folder or .gguf file."),
        task: str | None = typer.Option(None, "--task", "-t", help="passkey (default), needle, multi-needle, fidelity, "
                                        "distractor, or a RULER task: niah_single_1..3, niah_multikey_1..3, "
                                        "niah_multivalue, niah_multiquery, vt, cwe, fwe; reuse: multi-turn, multi-request, long-list, long-copy "
                                        "(docs/reuse.md). Not with --suite."),
        suite: str | None = typer.Option(None, "--suite", help="Run a whole suite instead of --task: `ruler` or `reuse` (its tasks "
                                         "into OUT/<task>/; `kvslim report OUT` prints the RULER table)."),
        suite_tasks: str | None = typer.Option(None, "--suite-tasks", help="With --suite: only these tasks (comma-separated)."),
        opts: list[str] | None = typer.Option(None, "--opt", help="A task option KEY=VALUE (repeatable), e.g. --opt "
                                              "haystack=noise --opt values=uuids."),
        batch: int = typer.Option(1, "--batch", "-b", help="Run up to this many cells of one recipe and length "
                                  "together (batched forward passes), 1..4096. Records then match one-by-one ones "
                                  "up to float rounding: log-probabilities within 5e-3 (measured on SmolLM2: full "
                                  "identical, recall-fp8 up to 2e-3), which could flip a near-tied answer token."),
        recipes: str | None = typer.Option(
            None, "--recipes", "-r",
            help="Recipes, comma- or ';'-separated, parameters included: 'full,v4+tq3,blocks:m=4,k=32,w=128' or "
            "'window:w=64;v4'; spellings of one recipe are one row (stored in canonical form, less where bytes live: "
            "recall:store=disk is stored without store=, and runs once with recall); full is always included (the "
            "default). With --engine vllm: vllm (stock vLLM, fp32 KV; the default), vllm:stock-bf16 (model and KV "
            "in bf16), vllm:stock-fp8 (vLLM's own fp8 KV), vllm:FORMAT (KV in kvslim's packed FORMAT through the "
            "plugin: vllm:fp32, vllm:bf16, vllm:tq4, vllm:tq3, ...; not KIVI), e.g. 'vllm;vllm:fp32;vllm:tq4'.",
        ),
        recipe: list[str] | None = typer.Option(None, "--recipe", help="One more recipe (repeatable), e.g. --recipe blocks:m=4,k=32."),
        lengths: str = typer.Option(
            "1000,2000", "--lengths", "-l",
            help="Prompt lengths in tokens; k = 1024, M = 2^20 as in `kvslim plan` (e.g. 1000,2k,4k; 0.5k = 512).",
        ),
        depths: str | None = typer.Option(None, "--depths", "-d", help="Needle depths in [0, 1] (0 = start; default "
                                          f"{DEFAULT_DEPTHS}); not for tasks without a needle depth (cwe, fwe, "
                                          "fidelity), except in a --suite, where they run as many seeds per seed."),
        seeds: str = typer.Option("0", "--seeds", "-s", help="Seeds, whole numbers >= 0 (each gives a different key/haystack cut)."),
        needles: int | None = typer.Option(None, "--needles", "-k", help="multi-needle: number of needles, 1..16 (default 3)."),
        eval_tokens: int | None = typer.Option(None, "--eval-tokens", help="fidelity: positions scored, >= 1 (default 64)."),
        max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", "-n", help="Answer budget in tokens, >= 1 (default: the task's)."),
        chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Force the chat template on/off (default: when present)."),
        ray: str | None = typer.Option(None, "--ray", help="Run on Ray: bare --ray (or --ray local) starts a local cluster; --ray ADDRESS joins one."),
        workers: int = typer.Option(2, "--workers", "-w", help="Ray actors, >= 1 (each loads the model once)."),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads per process, 0..4096 (0: torch's default; with --engine vllm: the engine's OMP threads, 0: 1)."),
        prefill_chunk: int = typer.Option(0, "--prefill-chunk", help="Feed each prompt in calls of at most this many "
                                          "tokens (0: one call; a one-token remainder joins the call before it). "
                                          "Only for recipes whose cache gives the same results in chunks (full, "
                                          "recall (2 or more tokens), v4, codecs but KIVI; not the eviction "
                                          "methods); faster on long prompts for models with sliding-window layers "
                                          "(Gemma 3)."),
        engine: str = typer.Option("transformers", "--engine", help="transformers (kvslim's caches in "
                                   "transformers' model) or vllm: the retrieval tasks through vLLM's own engine "
                                   "(vllm recipes only; vLLM runs in its environment, `make vllm`, as a subprocess; "
                                   "not with --suite, --ray, --batch or --prefill-chunk; docs/vllm.md)."),
        vllm_python: str | None = typer.Option(None, "--vllm-python", help="With --engine vllm: the Python of vLLM's "
                                               "environment (default: $KVSLIM_VLLM_PYTHON, else .venv-vllm/bin/python "
                                               "of this checkout, else this Python if it has vllm)."),
        vllm_kv_mib: int | None = typer.Option(None, "--vllm-kv-mib", help="With --engine vllm: vLLM's KV pool "
                                               "per engine in MiB (kv_cache_memory_bytes; default 512)."),
        force: bool = typer.Option(False, "--force", help="Write into a folder holding another configuration's results."),
        as_json: bool = typer.Option(False, "--json", help="No progress bar; print one JSON object at the end."),
    ) -> None:
        """Run a needle-in-a-haystack grid and append one JSON line per finished cell to OUT/results.jsonl.

        Every recipe sees identical prompts; `full` (a plain DynamicCache) is always a row. Rerunning the same command
        skips finished cells; one run at a time writes to OUT (a second is refused). Then `kvslim report OUT` prints
        the table and writes heatmaps. Every option is checked before anything is written to OUT (names and numbers
        before the model loads; lengths against its context after).
        """
        from ..eval.harness.runner import Grid, run_grid
        from ..units import check_int

        check_engine(engine, suite=suite, ray=ray, batch=batch, prefill_chunk=prefill_chunk,
                     vllm_python=vllm_python, vllm_kv_mib=vllm_kv_mib)
        tasks = check_suite_flags(suite, task, suite_tasks)
        task = task if task is not None else "passkey"
        if suite is None:
            check_depths(task, depths)
        depths = depths if depths is not None else DEFAULT_DEPTHS

        for flag, value in (("--needles", needles), ("--eval-tokens", eval_tokens), ("--max-new-tokens", max_new_tokens)):
            if value is not None:
                check_int(value, flag)
        check_int(batch, "--batch", minimum=1, maximum=4096)
        from ..cache.recipe import parse_recipe, split_recipe_list

        if recipes is None:
            recipes = "vllm" if engine == "vllm" and not recipe else "full"
        texts = split_recipe_list(recipes) if recipes.strip() else []
        texts += list(recipe or [])
        check_engine_recipes(engine, texts)
        # parsed once, here: the grid takes the Recipes (vLLM recipes are the engine's own names, checked above)
        names = texts if engine == "vllm" else [parse_recipe(t) for t in texts]
        options: dict = {}
        if needles is not None:
            options["k"] = needles
        if eval_tokens is not None:
            options["eval_tokens"] = eval_tokens
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        if chat is not None:
            options["chat"] = chat
        extra = parse_opts(opts or [])
        flags = {"k": "--needles", "eval_tokens": "--eval-tokens", "max_new_tokens": "--max-new-tokens", "chat": "--chat"}
        both = [k for k in extra if k in options]
        if both:
            from ..errors import InvalidInput

            raise InvalidInput(f"--opt {both[0]}={extra[both[0]]} and {flags[both[0]]} set the same option: give one")
        options.update(extra)
        if suite is not None:
            from ..eval.harness.suite import run_suite, suite_grids

            grids = suite_grids(suite, model=model, recipes=names, lengths=parse_list(lengths, int, "lengths"),
                                depths=parse_list(depths, float, "depths"), seeds=parse_list(seeds, int, "seeds"),
                                options=options, tasks=tasks)
            res = run_suite(grids, out, suite=suite, ray=ray, workers=workers, threads=threads, force=force,
                            progress=not as_json, batch=batch, warn=warn_line, prefill_chunk=prefill_chunk)
            if as_json:
                print_json(res)
            else:
                console.print(f"{res['ran']} cells run, {res['skipped']} already done over {len(grids)} tasks; "
                              f"results in {res['out']}/<task>/; then `kvslim report {out}`")
            return
        grid = Grid(
            task=task,
            model=model,
            recipes=names,
            lengths=parse_list(lengths, int, "lengths"),
            depths=parse_list(depths, float, "depths"),
            seeds=parse_list(seeds, int, "seeds"),
            options=options,
        )
        if engine == "vllm":
            from ..eval.harness.vllm_engine import DEFAULT_KV_MIB, run_vllm_grid

            res = run_vllm_grid(grid, out, check_format=check_vllm_format, python=vllm_python,
                                kv_mib=vllm_kv_mib if vllm_kv_mib is not None else DEFAULT_KV_MIB, threads=threads,
                                force=force, progress=not as_json, warn=warn_line)
            if as_json:
                print_json(res)
            else:
                console.print(f"{res['ran']} cells run, {res['skipped']} already done; results in {res['out']}")
            return
        res = run_grid(grid, out, ray=ray, workers=workers, threads=threads, force=force, progress=not as_json,
                       warn=warn_line, batch=batch, prefill_chunk=prefill_chunk)
        if as_json:
            print_json(res)
        else:
            console.print(f"{res['ran']} cells run, {res['skipped']} already done; results in {res['out']}")
