"""Issue 25 part 4: a fuzz pass (hypothesis, derandomized) over the vLLM plugin's format selection with vLLM: the
config hook that reads ``--additional-config`` and ``KVSLIM_VLLM_FORMAT`` in the front-end process, ``register``
(the entry point, with the variable only), and the backend's head-size check and page spec at any block size.

Every selection either installs one supported format (what would then serve) or ends in one ``SelectionError``
line; ``supports_head_size`` answers True or False for any head size (never raises, never allocates for a head size
no model has), and a page is ``block_size * kv_heads * 2 * row_bytes`` with the row of ``kvslim.formats`` (``int8``:
``d + 4``). The pure-Python half (the config reader, names, layouts, slots) is ``tests/test_fuzz_vllm_select.py``.

What the pass found here: ``{"kvslim": {"format": ""}}`` left the plugin off without a word (the hook's ``fmt or
env``), and a ``KVSLIM_VLLM_FORMAT`` holding a line break ended in a two-line SelectionError (the name was printed
raw).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm.v1.kv_cache_interface", reason="vLLM is not installed here: `make vllm` builds .venv-vllm")

from vllm.platforms import current_platform  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

import kvslim.vllm as plugin  # noqa: E402
from kvslim import formats  # noqa: E402
from kvslim.errors import InvalidInput  # noqa: E402
from kvslim.vllm.backend import KvslimAttentionBackend  # noqa: E402
from kvslim.vllm.layout import FORMATS_REFUSED, supported_formats  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from test_fuzz_vllm_select import HEADS, configs, format_names, memory_cap  # noqa: E402

pytestmark = pytest.mark.vllm
SETTINGS = {"deadline": timedelta(seconds=20), "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}  # fmt: skip


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg and "Traceback" not in msg, repr(msg)
    return msg


class _Env:
    """Set ``KVSLIM_VLLM_FORMAT`` (None: unset) and the plugin's selected format for one example, then restore."""

    def __init__(self, env: str | None) -> None:
        self.env = env

    def __enter__(self):
        self.saved = (os.environ.get(plugin.ENV), plugin._state["format"])
        os.environ.pop(plugin.ENV, None)
        if self.env is not None:
            os.environ[plugin.ENV] = self.env
        plugin._state["format"] = None
        return self

    def __exit__(self, *exc) -> None:
        os.environ.pop(plugin.ENV, None)
        if self.saved[0] is not None:
            os.environ[plugin.ENV] = self.saved[0]
        plugin._state["format"] = self.saved[1]


@pytest.fixture
def hook(monkeypatch):
    """The platform's config check with the plugin's hook; ``install`` recorded instead of routing attention."""
    installed: list[str] = []
    monkeypatch.setattr(plugin, "install", lambda fmt: installed.append(plugin._check_name(fmt)))
    plugin._hook_config_check()

    def check(config, head_size: int) -> str | None:
        installed.clear()
        cfg = SimpleNamespace(additional_config=config,
                              model_config=SimpleNamespace(get_head_size=lambda: head_size, use_mla=False))  # fmt: skip
        try:
            type(current_platform).check_and_update_config(cfg)
        except plugin.SelectionError:
            raise
        except Exception:  # vLLM's own check of the stand-in config, after the plugin's part
            if not installed and (os.environ.get(plugin.ENV, "").strip() or plugin.selection_from_config(config)):
                raise
        return installed[0] if installed else None

    return check


ENV_NAMES = format_names().filter(lambda s: "\x00" not in s)  # an environment variable cannot hold a NUL
ENVS = st.one_of(st.none(), st.just(""), ENV_NAMES)


@settings(max_examples=300, **SETTINGS)
@given(config=configs(), env=ENVS, head_size=HEADS)
def test_fuzz_the_config_hook(hook, config, env, head_size):
    with _Env(env), memory_cap():
        try:
            fmt = hook(config, head_size)
        except plugin.SelectionError as e:
            _one_line(e)
            return
        named = isinstance(config, dict) and "kvslim" in config
        if fmt is None:  # off only when nothing names a format
            assert not named and not (env or "").strip(), (config, env)
            return
        assert fmt in supported_formats() and fmt not in FORMATS_REFUSED
        assert os.environ[plugin.ENV] == fmt  # what the spawned engine processes read
        if named:
            assert fmt == plugin.selection_from_config(config).strip()
        if env and env.strip():
            assert fmt == env.strip()
        row = head_size + 4 if fmt == "int8" else formats.bytes_per_vector(fmt, head_size)
        plugin._state["format"] = fmt
        assert KvslimAttentionBackend.supports_head_size(head_size)
        spec = KvslimAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=head_size, dtype=torch.float16))
        assert spec.page_size_bytes == 16 * 2 * 2 * row


@settings(max_examples=100, **SETTINGS)
@given(env=ENV_NAMES)
def test_fuzz_register_with_the_variable(env):
    if env.strip() in supported_formats():
        return  # a valid name installs the backend for the whole process: the hook test covers it
    with _Env(env):
        try:
            plugin.register()
        except plugin.SelectionError as e:
            assert plugin.ENV in _one_line(e)
            return
        assert not env.strip() and plugin.selected_format() is None  # empty: off


@settings(max_examples=200, **SETTINGS)
@given(fmt=st.sampled_from(supported_formats()), head_size=HEADS, block=st.sampled_from([1, 2, 16, 32, 128, 1008]),
       kv_heads=st.integers(1, 16), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_fuzz_head_sizes_and_block_sizes(fmt, head_size, block, kv_heads, dtype):  # fmt: skip
    with _Env(None), memory_cap():
        plugin._state["format"] = fmt
        ok = KvslimAttentionBackend.supports_head_size(head_size)
        assert ok in (True, False)
        stock = FullAttentionSpec(block_size=block, num_kv_heads=kv_heads, head_size=head_size, dtype=dtype)
        try:
            spec = KvslimAttentionBackend.customize_spec(stock)
        except InvalidInput as e:
            assert not ok and f"'{fmt}'" in _one_line(e)
            return
        assert ok
        row = head_size + 4 if fmt == "int8" else formats.bytes_per_vector(fmt, head_size)
        assert spec.dtype == torch.uint8 and spec.page_size_bytes == block * kv_heads * 2 * row


# ---- what the pass found -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{"kvslim": {"format": ""}}, {"kvslim": ""}])
def test_an_empty_format_in_the_config_is_refused(hook, config):
    with _Env(None), pytest.raises(plugin.SelectionError, match="empty format"):
        hook(config, 64)


def test_a_line_break_in_the_variable_stays_on_one_line():
    with _Env("tq\n4"), pytest.raises(plugin.SelectionError) as exc:
        plugin.register()
    assert _one_line(exc.value).startswith(f"{plugin.ENV}='tq\\n4': ")
