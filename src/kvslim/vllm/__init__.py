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
BACKEND_NAME = "KVSLIM"
_log = logging.getLogger("kvslim.vllm")
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
    unknown = sorted(set(sel) - {"format"})
    if unknown:
        raise InvalidInput(f"--additional-config kvslim takes only \"format\", got also {unknown}")
    return _non_empty(sel["format"])


def _non_empty(fmt: str) -> str:
    """An empty name would leave the plugin off while ``--additional-config`` asks for it: refused."""
    if not fmt.strip():
        from .layout import supported_formats

        raise InvalidInput(f"--additional-config kvslim names an empty format {fmt!r}; choose one of "
                           f"{', '.join(supported_formats())}")  # fmt: skip
    return fmt


def _check_name(fmt: str) -> str:
    from .layout import FORMATS_REFUSED, make_codec, supported_formats

    fmt = fmt.strip()
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

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)  # layers look their backend up by get_name()
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)  # the CPU platform accepts only CPU_ATTN
    else:
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)  # --attention-backend CUSTOM
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

                make_codec(fmt, model_config.get_head_size())  # a head size the format cannot take fails here
                if model_config.use_mla:
                    raise InvalidInput(f"kvslim format {fmt!r}: MLA models are not supported by the vLLM plugin")
            os.environ[ENV] = fmt  # spawned engine processes inherit it
            install(fmt)

    platform_cls.check_and_update_config = classmethod(
        lambda cls, vllm_config: check_and_update_config(vllm_config))
    _state["hooked"] = True


def register() -> None:
    """The ``vllm.general_plugins`` entry point: off unless a kvslim format is selected (see the module doc)."""
    _hook_config_check()
    fmt = os.environ.get(ENV, "").strip()
    if fmt:
        try:
            install(fmt)
        except InvalidInput as exc:
            raise SelectionError(f"{ENV}={fmt!r}: {exc}") from None
