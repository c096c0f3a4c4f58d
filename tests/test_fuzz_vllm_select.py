"""Issue 25 part 4: a fuzz pass (hypothesis, derandomized) over the vLLM plugin's format selection, without vLLM.

How a format is chosen: ``--additional-config {"kvslim": ...}`` (:func:`kvslim.vllm.selection_from_config`) or
``KVSLIM_VLLM_FORMAT``, the name checked (``_check_name``), then the format's codec and row layout at the model's
head size (:func:`kvslim.vllm.layout.make_codec`, :class:`~kvslim.vllm.layout.RowLayout`). Hypothesis draws the
config (valid names, KIVI, unknown names, empty, odd case and whitespace, numbers, nested junk, extra keys) and head
sizes (0, negative, odd, the usual ones, huge): every input either gives a layout whose row is the byte count of
``kvslim.formats`` (``int8``, the plugin's own format: ``d + 4``), or one ``InvalidInput`` line naming the problem,
within a memory limit (nothing is allocated for a head size no model has). Pages: for any block size, head count and
slot mapping (padding included), rows written through ``write_slots`` read back through ``gather_rows`` as encoded,
and a page is ``block_size * heads * 2 * row_bytes`` bytes. The parts that need vLLM (the config hook, the backend's
head-size check and page spec) are in ``tests/vllm/test_fuzz_select.py``.

What the pass found (tests at the bottom): a head size of 2^20 or more (TurboQuant: from 2^20, the others from 2^40)
was accepted by the name check and then allocated terabytes (the d x d rotation, the probe row) and failed with
the allocator's message, not one line; ``{"kvslim": {"format": ""}}`` (and ``{"kvslim": ""}``) silently left the
plugin off while ``{"kvslim": {}}`` was refused.
"""

from __future__ import annotations

import resource
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvslim.vllm as plugin
from kvslim import formats
from kvslim.errors import InvalidInput, KvslimError
from kvslim.vllm.layout import (
    FORMATS_REFUSED,
    RowLayout,
    gather_rows,
    make_codec,
    supported_formats,
    write_slots,
)

SETTINGS = {"deadline": timedelta(seconds=20), "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow]}  # fmt: skip
NAMES = [*supported_formats(), *FORMATS_REFUSED, *formats.REGISTRY]


@st.composite
def format_names(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from([*NAMES, *NAMES, "", "tq", "tq9", "tq-1", "tq4.0", "int4", "kivi", "KIVI2", "fp8_e4m3",
                                 "tq99999999999999999999", "none", "auto", "full"]))  # fmt: skip
    spell = draw(st.sampled_from(["same", "same", "same", "same", "upper", "title", "pad", "pad", "inner", "tail"]))
    if spell == "upper":
        base = base.upper()
    elif spell == "title":
        base = base.title()
    elif spell == "pad":
        base = draw(st.sampled_from([" ", "\t", "\n", "  "])) + base + draw(st.sampled_from(["", " ", "\n", "\r\n"]))
    elif spell == "inner" and base:
        base = base[:1] + draw(st.sampled_from([" ", "-", "_", "\n", "\x00"])) + base[1:]
    elif spell == "tail":
        base += draw(st.sampled_from([":bits=4", ",", "+fp8", "@64", ":-1", ":1e30"]))
    return base


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.just([]), st.just({}),
                 st.lists(st.text(max_size=5), max_size=2))  # fmt: skip


@st.composite
def configs(draw: st.DrawFn):
    """``--additional-config``: mostly ``{"kvslim": {"format": NAME}}`` and ``{"kvslim": NAME}``, some junk."""
    kind = draw(st.sampled_from(["format", "format", "format", "name", "name", "extra", "junk", "off"]))
    if kind == "off":
        return draw(st.one_of(JUNK, st.just({}), st.dictionaries(st.sampled_from(["other", "KVSLIM"]), JUNK, max_size=1)))
    name = draw(st.one_of(format_names(), JUNK) if kind == "junk" else format_names())
    if kind == "name":
        return {"kvslim": name}
    extra = draw(st.dictionaries(st.sampled_from(["bits", "Format", "seed", "format "]), JUNK, min_size=1, max_size=2))
    return {"kvslim": {"format": name, **(extra if kind == "extra" else {})}}


HEADS = st.one_of(st.sampled_from([64, 128, 256, 80, 96, 112, 72, 40, 3, 4, 8]), st.integers(-3, 300),
                  st.sampled_from([0, 1, 2, 7, 9, 62, 4095, 4096, 4097, 8192, 2**20, 2**31, 2**40, 2**63]))  # fmt: skip


@contextmanager
def memory_cap(extra: int = 600 << 20):
    """Fail any allocation that takes the address space ``extra`` bytes above its size now."""
    with open("/proc/self/status") as f:
        vm = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg and "Traceback" not in msg, repr(msg)
    return msg


def _select(config, head_size: int):
    """What the plugin's config hook does with ``--additional-config`` (no env var): the name, then the codec at
    the model's head size; the layout the backend builds from it."""
    fmt = plugin.selection_from_config(config)
    if fmt is None:
        return None, None
    fmt = plugin._check_name(fmt)
    make_codec(fmt, head_size)
    return fmt, RowLayout(fmt, head_size)


@settings(max_examples=600, **SETTINGS)
@given(config=configs(), head_size=HEADS)
def test_fuzz_selection_gives_the_format_bytes_or_one_line(config, head_size):
    try:
        with memory_cap():
            fmt, layout = _select(config, head_size)
    except KvslimError as e:
        msg = _one_line(e)
        sel = config.get("kvslim") if isinstance(config, dict) else None
        name = sel.get("format") if isinstance(sel, dict) else sel
        if isinstance(name, str) and name.strip() and "takes only" not in msg:
            assert repr(name.strip()) in msg, msg  # names the format it refuses
        return
    if fmt is None:  # the plugin stays off only when nothing names kvslim
        assert not (isinstance(config, dict) and "kvslim" in config), config
        return
    assert fmt in supported_formats() and fmt not in FORMATS_REFUSED
    want = head_size + 4 if fmt == "int8" else formats.bytes_per_vector(fmt, head_size)
    assert layout.row_bytes == want == layout.codec.bytes_per_vector()
    x = torch.randn(2, head_size, generator=torch.Generator().manual_seed(0))
    rows = layout.encode(x)
    assert rows.dtype == torch.uint8 and rows.shape == (2, want)
    assert torch.isfinite(layout.decode(rows)).all()


@settings(max_examples=60, **SETTINGS)
@given(fmt=st.sampled_from(supported_formats()), head_size=st.sampled_from([8, 16, 64]), block=st.integers(1, 33),
       heads=st.integers(1, 3), tokens=st.integers(0, 70), pad=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_fuzz_pages_any_block_size(fmt, head_size, block, heads, tokens, pad, seed):  # fmt: skip
    """Rows written at any slots of pages of any block size read back as encoded; a page is
    ``block * heads * 2 * row_bytes`` bytes."""
    try:
        layout = RowLayout(fmt, head_size)
    except InvalidInput as e:  # tq2.5 at 8: one line naming the format and the head size
        assert f"'{fmt}'" in _one_line(e) and str(head_size) in str(e)
        return
    g = torch.Generator().manual_seed(seed)
    nblocks = -(-tokens // block) + 2
    cache = torch.zeros(nblocks, heads, block, 2 * layout.row_bytes, dtype=torch.uint8)
    assert cache[0].numel() == block * heads * 2 * layout.row_bytes
    table = torch.randperm(nblocks, generator=g)
    pos = torch.arange(tokens)
    slots = table[pos // block] * block + pos % block
    k, v = torch.randn(tokens + pad, heads, head_size, generator=g), torch.randn(tokens + pad, heads, head_size, generator=g)
    mapping = torch.cat([slots, torch.full((pad,), -1)])  # padding rows: negative slots, skipped
    perm = torch.randperm(tokens + pad, generator=g)
    write_slots(cache, layout, k[perm], v[perm], mapping[perm])
    if tokens:
        rows = gather_rows(cache, table, tokens)  # [H, T, 2R]
        r = layout.row_bytes
        assert torch.equal(rows[..., :r], layout.encode(k[:tokens]).transpose(0, 1))
        assert torch.equal(rows[..., r:], layout.encode(v[:tokens]).transpose(0, 1))


# ---- what the pass found -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["tq4", "tqprod2", "tq2.5", "fp32", "int8"])
@pytest.mark.parametrize("head_size", [2**20, 2**40, 2**63])
def test_a_head_size_no_model_has_is_refused_before_allocating(fmt, head_size):
    """tq4 at 2^20 allocated its 2^20 x 2^20 rotation (8 TB) and failed with the allocator's message (and vLLM's
    ``supports_head_size`` let that RuntimeError through); fp32 at 2^40 a 4 TB probe row."""
    with memory_cap(), pytest.raises(InvalidInput, match=rf"'{fmt}'.*head size {head_size}") as exc:
        RowLayout(fmt, head_size)
    _one_line(exc.value)
    for fine in (64, 256, 512):
        assert RowLayout(fmt, fine).row_bytes > 0


@pytest.mark.parametrize("config", [{"kvslim": {"format": ""}}, {"kvslim": ""}, {"kvslim": {"format": " \n"}},
                                    {"kvslim": "  "}])  # fmt: skip
def test_an_empty_format_is_refused_not_ignored(config):
    """An empty name left the plugin off without a word (``{"kvslim": {}}`` was refused): it is refused in one
    line, as an unknown name is."""
    with pytest.raises(InvalidInput, match="empty") as exc:
        fmt = plugin.selection_from_config(config)
        plugin._check_name(fmt)
    _one_line(exc.value)
