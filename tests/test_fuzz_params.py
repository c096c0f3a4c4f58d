"""Issue 25 part 4: a fuzz pass (hypothesis) over every numeric parameter of every registered method.

For each method (the built-ins and the test plugin) hypothesis draws values for its numeric parameters (small ones,
boundaries, huge ones, NaN and infinities; its choice parameters from their choices) and a codec. Each recipe must be
refused with one ``InvalidInput`` line by the recipe check (``parse_recipe``, then the model check of ``make_cache``
and of the planner), or be priced by the planner and run a short prefill, a second call and decode steps on a tiny
model within a time limit and an address-space limit a few hundred MB above the process's, so that a configuration
that would allocate more is caught (it must be refused before allocating). Hypothesis runs derandomized (the same
examples on every machine); with the recall fix reverted it finds the nbr hang by itself.

What the pass found (each has a test below the fuzz test): recall ``nbr=1e9`` looped nbr times per selection (a
hang); recall ``summary=reps,r=100000`` allocated r vectors per block (22 GB); recall ``pin=1e12`` allocated a
``[b, h, pin]`` tensor at the first token (8 TB) and ``span=1e9`` looped span times per decode step; blocks/v4
``overlap=1e8`` gathered ``m + overlap`` keys per pooled block (GBs); ``w`` near 2^63 with a few sinks wrapped
around in int64 and hid every token (a silently wrong answer). Nothing else: every other numeric parameter of every
method is refused in one line or runs bounded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import resource
import signal
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvslim.cache import make_cache, predict_nbytes
from kvslim.cache.method import ModelShape, methods
from kvslim.cache.recipe import parse_recipe
from kvslim.errors import KvslimError
from kvslim.plan.presets import get_preset
from kvslim.plan.pricing import price_recipe


def _load_plugins() -> None:  # the same modules test_method_contract loads (guarded by their module names)
    for path in sorted((Path(__file__).parent / "plugins").glob("*.py")):
        name = f"kvslim_test_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None or name in sys.modules:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_load_plugins()
METHODS = methods()
EXTRA_BYTES = 400 << 20  # address space allowed above what the process holds when an example starts
SECONDS = 20  # per example (a tiny model: real examples take well under a second)
EXAMPLES = {"recall": 80, "v4": 60, "blocks": 60, "heavy": 40}  # the methods with the most parameters that size work

# large values that pass the range check (what a bound must catch), and some that do not (refused in one line)
IN_RANGE = st.sampled_from([10**9, 10**12, 2**31, 2**62, 2**63 - 1, 1000])
HUGE = st.one_of(IN_RANGE, IN_RANGE, IN_RANGE, st.sampled_from([2**63, -1, -(2**63), 10**30]))
ODD_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1.5, 10.0]))
FLOATS = st.sampled_from([0.01, 0.25, 0.5, 0.999, 1.0])
CODECS = st.sampled_from(["", "", "fp8", "tq3", "kivi2"])


def _fields(name: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(METHODS[name].Params) if f.name != "dir"]


def _value(f: dataclasses.Field, extreme: bool) -> st.SearchStrategy:
    choices = f.metadata.get("choices")
    if isinstance(f.default, float):
        return ODD_FLOATS if extreme else FLOATS
    if isinstance(f.default, int):
        if extreme:
            return HUGE
        lo = f.metadata.get("lo") or 0  # values a 40-token prompt exercises (blocks leave small windows)
        return st.sampled_from(choices) if choices else st.one_of(st.integers(lo, lo + 5), st.integers(lo, 40))
    if choices is not None:
        return st.sampled_from(choices)
    return st.just(f.default)  # other strings (cold codecs): the default


@st.composite
def recipes(draw: st.DrawFn, name: str) -> str:
    """``name:key=value,...[+codec]``: one of the method's small ``examples`` or ``lossless`` settings (made for the
    tiny models, so tokens leave small windows) or its defaults, up to three parameters redrawn, up to two of them
    extreme."""
    cls = METHODS[name]
    fields = _fields(name)
    bases = [*cls.examples, *cls.lossless]
    base = dict(draw(st.sampled_from([*bases, {}]))) if bases else {}
    chosen = draw(st.lists(st.sampled_from(fields), unique_by=lambda f: f.name, min_size=1, max_size=3)) if fields else []
    wild = {f.name for f in chosen[: draw(st.sampled_from([1, 1, 2, 0]))]}
    base.update({f.name: draw(_value(f, f.name in wild)) for f in chosen})
    args = [f"{k}={v}" for k, v in base.items()]
    if draw(st.integers(0, 5)) == 0:
        args.append(f"full_first={draw(st.sampled_from([0, 1, 3, 10**12]))}")
    codec = draw(CODECS)
    return name + (":" + ",".join(args) if args else "") + (f"+{codec}" if codec else "")


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@contextmanager
def bounded(seconds: int, extra: int):
    """Raise TimeoutError after ``seconds`` and fail any allocation that takes the address space ``extra`` bytes
    above its size now (torch raises RuntimeError "can't allocate memory", Python MemoryError)."""

    def alarm(_sig, _frame):
        raise TimeoutError(f"the example ran over {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + extra
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: Exception) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)


def _exercise(model, text: str) -> None:
    try:
        recipe = parse_recipe(text)
    except KvslimError as e:
        _one_line(e)
        return
    for n in (1, 100, 10**6):  # the planner: arithmetic only, whatever the numbers
        try:
            price_recipe(get_preset("smollm2-135m"), str(recipe), n)
        except KvslimError as e:
            _one_line(e)
    try:
        cache = make_cache(model, recipe)
    except KvslimError as e:
        _one_line(e)
        return
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            model(input_ids=ids[:, :30], cache=cache, use_cache=True)
            model(input_ids=ids[:, 30:38], cache=cache, use_cache=True)
            model(input_ids=ids[:, 38:39], cache=cache, use_cache=True)
            model(input_ids=ids[:, 39:40], cache=cache, use_cache=True)
        assert cache.get_seq_length() == 40
        cache.tier_nbytes()
    except KvslimError as e:  # refused at run time (e.g. an eviction budget above the prompt): one line
        _one_line(e)
    finally:
        cache.close()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fuzz_every_numeric_parameter(tiny_models, name):
    model = tiny_models["gemma3" if name in ("recall", "v4") else "llama"]
    ModelShape.from_model(model)

    @settings(max_examples=EXAMPLES.get(name, 25), deadline=timedelta(seconds=10), derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(text=recipes(name))
    def run(text: str) -> None:
        with bounded(SECONDS, EXTRA_BYTES):
            try:
                _exercise(model, text)
            except (TimeoutError, MemoryError, RuntimeError) as e:
                raise AssertionError(f"{text}: {type(e).__name__}: {str(e)[:200]}") from None

    run()


# ---- what the fuzz pass found (issue 25 defects 3 and 4 among them), one test each -------------------------------
def _logits(model, text: str, n: int = 40):
    ids = torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, text)
    try:
        with torch.inference_mode(), bounded(SECONDS, EXTRA_BYTES):
            outs = [model(input_ids=ids[:, :30], cache=cache, use_cache=True).logits]
            outs += [model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, n)]
        return torch.cat(outs, 1), [x.nbytes(include_codec_state=False) for x in cache.layers]
    finally:
        cache.close()


def test_recall_huge_nbr_selects_every_block_at_once(tiny_models):
    """nbr=1e9 passed the check and then looped 1e9 times per selection: a neighbour farther than the blocks that
    exist is no block, so it equals nbr = blocks - 1 (bit-identical), in bounded time."""
    model = tiny_models["gemma3"]
    huge, _ = _logits(model, "recall:m=4,w=8,sinks=2,k=1,nbr=1000000000")
    enough, _ = _logits(model, "recall:m=4,w=8,sinks=2,k=1,nbr=20")
    assert torch.equal(huge, enough)


def test_recall_reps_r_is_bounded_by_m():
    """r=100000 passed the check and allocated r summary vectors per block (22 GB): r <= m, refused in one line by
    the recipe check, ``recipes --check`` and ``plan -r``."""
    from typer.testing import CliRunner

    from kvslim.cli import app
    from kvslim.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"r=100000 .* m=32 .*r <= m"):
        parse_recipe("recall:summary=reps,r=100000")
    parse_recipe("recall:summary=reps,r=32")  # r = m: every key of a block
    runner = CliRunner()
    for args in (["recipes", "--check", "recall:summary=reps,r=100000"],
                 ["plan", "smollm2-135m", "-r", "recall:summary=reps,r=100000", "--context", "4k"]):  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "r <= m" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("text", ["recall:m=4,w=8,k=0,pin=1000000000000", "recall:m=4,w=8,k=0,pin=2,span=1000000000",
                                  "recall:m=4,w=8,k=4611686018427387904,pin=4611686018427387904"])
def test_recall_huge_pin_or_span_allocates_only_blocks_that_exist(tiny_models, text):
    """pin sized a [b, h, pin] tensor at the first token (pin=1e12: 8 TB) and span looped span times per decode step:
    pin slots now grow with the blocks out of the window (no more can be pinned) and span stops at them; the bytes
    still equal the planner's prediction."""
    model = tiny_models["gemma3"]
    _, measured = _logits(model, text)
    assert measured == predict_nbytes(ModelShape.from_model(model), text, 40)


@pytest.mark.parametrize("name", ["v4", "blocks"])
def test_huge_overlap_pools_only_tokens_seen(tiny_models, name):
    """overlap=1e8 gathered (m + overlap) keys per pooled block (GBs at once): columns before the first token are
    masked anyway, so the overlap is cut to the tokens seen, and pooling runs in groups of bounded size; an overlap
    that reaches every earlier token gives the same entries as one larger than the context (bit-identical)."""
    model = tiny_models["llama"]
    huge, measured = _logits(model, f"{name}:m=4,w=8,sinks=2,overlap=100000000")
    assert torch.isfinite(huge).all()
    assert measured == predict_nbytes(ModelShape.from_model(model), f"{name}:m=4,w=8,sinks=2,overlap=100000000", 40)


def test_pooling_in_groups_equals_pooling_at_once(tiny_models, monkeypatch):
    """The group size bounds memory only: entries pooled one block at a time equal those pooled in one group (up to
    float rounding: no codec here, and elementwise kernels may round a tensor's tail elements differently by size)."""
    import kvslim.cache.methods.blocks as blocks

    model = tiny_models["llama"]
    one, _ = _logits(model, "blocks:m=4,w=8,sinks=2,overlap=3,k=2")
    monkeypatch.setattr(blocks, "_POOL_BYTES", 1)
    grouped, _ = _logits(model, "blocks:m=4,w=8,sinks=2,overlap=3,k=2")
    torch.testing.assert_close(grouped, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["window", "blocks", "heavy", "v4", "recall"])
@pytest.mark.parametrize("huge", [2**63 - 1, 2**62 + 1])
def test_windows_beyond_any_sequence_do_not_wrap_around(tiny_models, name, huge):
    """w near 2^63 with a few sinks made the column rule's t - w + 1 - sinks wrap around in int64 and hide every
    token (a silently wrong answer, found by comparing with a window longer than the prompt): now the same
    computation as w=1000, bit-identical; likewise sinks near 2^63."""
    model = tiny_models["llama"]
    want, _ = _logits(model, f"{name}:w=1000,sinks=3")
    assert torch.equal(_logits(model, f"{name}:w={huge},sinks=3")[0], want)
    want, _ = _logits(model, f"{name}:w=5,sinks=1000")
    assert torch.equal(_logits(model, f"{name}:w={huge},sinks={huge}")[0], want)
    assert torch.equal(_logits(model, f"{name}:w=5,sinks={huge}")[0], want)
