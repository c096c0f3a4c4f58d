"""kvslim's packed KV formats inside vLLM: a ``vllm.general_plugins`` entry point and an attention backend.

vLLM calls :func:`register` in every one of its processes. It does nothing unless a kvslim format is selected,
either with ``--additional-config '{"kvslim": {"format": "tq4"}}'`` (``LLM(..., additional_config=...)``) or the
environment variable ``KVSLIM_VLLM_FORMAT=tq4``. Then the attention backend :mod:`kvslim.vllm.backend` takes over
every decoder attention layer: on the CPU platform by overriding ``CPU_ATTN`` (the only backend vLLM's CPU platform
accepts), elsewhere as the ``CUSTOM`` backend (``--attention-backend CUSTOM``). Its pages hold each token's K and V
as kvslim packed rows (:mod:`kvslim.vllm.layout`), so vLLM sizes a pool of ``fp32 bytes / format bytes`` more tokens.

The selection in ``--additional-config`` is read in the front-end process when vLLM validates its config (the
platform's ``check_and_update_config``), checked against the model's head size there (a bad selection fails before
any engine process starts, with one :class:`SelectionError` line), and handed to the engine processes
(spawned) through ``KVSLIM_VLLM_FORMAT``. This module imports neither vLLM nor transformers at import time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kvslim.errors import InvalidInput, KvslimError

__all__ = ["ENV", "BACKEND_PATH", "SelectionError", "register", "selected_format", "selection_from_config",
           "install"]


class SelectionError(KvslimError, RuntimeError):
    """A kvslim selection vLLM cannot start with. Not a ValueError on purpose: vLLM validates its config with
    pydantic, which would bury a ValueError's message under its own report; this one ends the traceback as one
    line naming the format."""

ENV = "KVSLIM_VLLM_FORMAT"
BACKEND_PATH = "kvslim.vllm.backend.KvslimAttentionBackend"
RECALL_PATH = "kvslim.vllm.recall.KvslimRecallBackend"
BACKEND_NAME = "KVSLIM"
_log = logging.getLogger("vllm.kvslim")  # under vLLM's logger: its handler prints it
_state: dict[str, Any] = {"format": None, "installed": False, "hooked": False}


def selected_format() -> str | None:
    """The format this process serves with (``None``: the plugin is off)."""
    return _state["format"]


def selection_from_config(additional_config: Any) -> str | None:
    """The format named by ``additional_config["kvslim"]["format"]`` (also accepts ``{"kvslim": "tq4"}``)."""
    if not isinstance(additional_config, dict) or "kvslim" not in additional_config:
        return None
    sel = additional_config["kvslim"]
    if isinstance(sel, str):
        return _non_empty(sel)
    if not isinstance(sel, dict) or not isinstance(sel.get("format"), str):
        raise InvalidInput(
            f"--additional-config kvslim must be {{\"format\": NAME}} (e.g. {{\"kvslim\": {{\"format\": \"tq4\"}}}}), "
            f"got {sel!r}"
        )
    unknown = sorted(set(sel) - {"format", "cold_bytes"})
    if unknown:
        raise InvalidInput(f"--additional-config kvslim takes only \"format\" and \"cold_bytes\", got also {unknown}")
    fmt = _non_empty(sel["format"])
    if "cold_bytes" in sel:
        from .recall_spec import cold_bytes_setting, is_recall

        if not is_recall(fmt):
            raise InvalidInput(f"--additional-config kvslim: cold_bytes sizes a recall format's cold tier; "
                               f"format {fmt!r} has none")
        cold_bytes_setting(sel["cold_bytes"])  # checked here, read by cold_bytes_from_config
    return fmt


def cold_bytes_from_config(additional_config: Any) -> int | None:
    """``additional_config["kvslim"]["cold_bytes"]`` when given (a recall format's cold tier, in bytes)."""
    sel = additional_config.get("kvslim") if isinstance(additional_config, dict) else None
    if isinstance(sel, dict) and "cold_bytes" in sel:
        from .recall_spec import cold_bytes_setting

        return cold_bytes_setting(sel["cold_bytes"])
    return None


def _non_empty(fmt: str) -> str:
    """An empty name would leave the plugin off while ``--additional-config`` asks for it: refused."""
    if not fmt.strip():
        from .layout import supported_formats

        raise InvalidInput(f"--additional-config kvslim names an empty format {fmt!r}; choose one of "
                           f"{', '.join(supported_formats())}")  # fmt: skip
    return fmt


def _check_name(fmt: str) -> str:
    from .layout import FORMATS_REFUSED, make_codec, supported_formats
    from .recall_spec import is_recall, parse_recall

    fmt = fmt.strip()
    if is_recall(fmt):
        parse_recall(fmt)  # raises the one-line refusal
        return fmt
    if fmt in FORMATS_REFUSED or fmt not in supported_formats():
        make_codec(fmt, 64)  # raises the one-line refusal naming the format
    return fmt


def install(fmt: str) -> None:
    """Make ``fmt`` this process's format and route vLLM's attention to kvslim's backend (idempotent)."""
    fmt = _check_name(fmt)
    if _state["format"] not in (None, fmt):
        raise InvalidInput(f"kvslim format {fmt!r} selected, but this process already serves {_state['format']!r}")
    _state["format"] = fmt
    if _state["installed"]:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .recall_spec import is_recall

    path = RECALL_PATH if is_recall(fmt) else BACKEND_PATH
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, path)  # layers look their backend up by get_name()
    else:
        register_backend(AttentionBackendEnum[BACKEND_NAME], path)
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, path)  # the CPU platform accepts only CPU_ATTN
    else:
        register_backend(AttentionBackendEnum.CUSTOM, path)  # --attention-backend CUSTOM
    _state["installed"] = True
    _log.info("kvslim: KV cache stored as %s", fmt)


def _hook_config_check() -> None:
    """Read ``--additional-config`` where vLLM validates its config in the front-end process (before it spawns)."""
    if _state["hooked"]:
        return
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config

    def check_and_update_config(vllm_config) -> None:
        try:
            _select_from_config(vllm_config)
        except InvalidInput as exc:
            raise SelectionError(str(exc)) from None
        original(vllm_config)

    def _select_from_config(vllm_config) -> None:
        fmt = selection_from_config(getattr(vllm_config, "additional_config", None))
        env = os.environ.get(ENV, "").strip() or None
        if fmt is not None and env is not None and fmt.strip() != env:
            raise InvalidInput(f"kvslim format {fmt!r} in --additional-config but {ENV}={env!r}; choose one")
        fmt = fmt or env
        if fmt is not None:
            fmt = _check_name(fmt)
            model_config = getattr(vllm_config, "model_config", None)
            if model_config is not None:
                from .layout import make_codec

                if model_config.use_mla:
                    raise InvalidInput(f"kvslim format {fmt!r}: MLA models are not supported by the vLLM plugin")
                from .recall_spec import is_recall

                if is_recall(fmt):
                    _size_recall(fmt, vllm_config, cold_bytes_from_config(vllm_config.additional_config))
                else:
                    make_codec(fmt, model_config.get_head_size())  # a head size the format cannot take fails here
            os.environ[ENV] = fmt  # spawned engine processes inherit it
            install(fmt)

    platform_cls.check_and_update_config = classmethod(
        lambda cls, vllm_config: check_and_update_config(vllm_config))
    _state["hooked"] = True


def _size_recall(fmt: str, vllm_config: Any, cold_bytes: int | None) -> None:
    """A recall format: vLLM's block size becomes the recipe's ``m``, and vLLM's block count is capped so the pool
    never promises more tokens than the cold array (``cold_bytes``) holds (``num_gpu_blocks_override``, the smaller
    of what the KV budget and the cold tier allow). Logs what each tier holds per token."""
    from .layout import make_codec
    from .recall_spec import COLD_ENV, cold_bytes_setting, parse_recall

    rf = parse_recall(fmt)
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    d, dtype = mc.get_head_size(), str(mc.dtype).replace("torch.", "")
    sfmt, cfmt = rf.summary_format(dtype), rf.cold_format(dtype)
    srow = make_codec(sfmt, d).bytes_per_vector()  # a head size either codec cannot take fails here
    crow = make_codec(cfmt, d).bytes_per_vector()
    if cc.user_specified_block_size and cc.block_size != rf.m:
        raise InvalidInput(f"kvslim format {fmt!r}: --block-size {cc.block_size} differs from the recipe's block "
                           f"m={rf.m}; leave --block-size out (the plugin sets it to m) or give m={cc.block_size}")  # fmt: skip
    cc.block_size = rf.m
    cc.user_specified_block_size = True
    cold = cold_bytes_setting(cold_bytes)
    os.environ[COLD_ENV] = str(cold)  # spawned engine processes size the same way
    layers, heads = mc.get_num_layers(pc), mc.get_num_kv_heads(pc)
    hot_block = layers * heads * rf.m * rf.cell_bytes(srow)
    cold_block = layers * heads * rf.m * 2 * crow
    blocks = cold // cold_block
    budget = getattr(cc, "kv_cache_memory_bytes", None)
    if budget:
        blocks = min(blocks, budget // hot_block)
    if cc.num_gpu_blocks_override is not None:
        blocks = min(blocks, cc.num_gpu_blocks_override)
    need = -(-mc.max_model_len // rf.m) + 1  # one request of max_model_len + vLLM's null block
    if blocks < need:
        raise InvalidInput(f"kvslim format {fmt!r}: cold_bytes={cold} holds {cold // cold_block} blocks of {rf.m} "
                           f"tokens ({cold_block} B each, {cfmt} rows), fewer than one {mc.max_model_len}-token "
                           f"request needs ({need}); raise cold_bytes or lower max_model_len")  # fmt: skip
    cc.num_gpu_blocks_override = int(blocks)
    _log.info("kvslim recall %s: hot (vLLM's pages): %s block summaries + pin stamps (%d B per block and KV head), "
              "%d B per token (all layers); cold array: %s rows, %d B per token (all layers); cold_bytes=%d holds %d "
              "blocks%s; vLLM's pool: %d blocks of %d tokens (%d tokens)", rf.recipe, sfmt, rf.stamp_bytes,
              hot_block // rf.m, cfmt, cold_block // rf.m, cold,
              cold // cold_block, f", the KV budget of {budget} B {budget // hot_block}" if budget else "", blocks,
              rf.m, blocks * rf.m)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: off unless a kvslim format is selected (see the module doc)."""
    _hook_config_check()
    fmt = os.environ.get(ENV, "").strip()
    if fmt:
        try:
            install(fmt)
        except InvalidInput as exc:
            raise SelectionError(f"{ENV}={fmt!r}: {exc}") from None
