"""kvslim: plan, run and measure DeepSeek-V4-style KV-cache compression.

The public API is re-exported here lazily: ``import kvslim`` imports neither torch nor transformers, and has no
side effects. Attribute access (``kvslim.load``) imports the defining module on first use.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> defining module
_EXPORTS: dict[str, str] = {
    "KvslimError": "kvslim.errors",
    "InvalidInput": "kvslim.errors",
    "MissingModelPackage": "kvslim.errors",
    "ContextTooLong": "kvslim.errors",
    "load": "kvslim.models",
    "EMBEDDED_MODELS": "kvslim.models",
    "DEFAULT_MODEL": "kvslim.models",
    "cache_nbytes": "kvslim.memory",
    "generate": "kvslim.generation",
    "prefill": "kvslim.generation",
    "make_cache": "kvslim.cache",
    "compressed": "kvslim.cache",
    "fork_cache": "kvslim.cache.fork",
    "parse_recipe": "kvslim.cache.recipe",
    "list_recipes": "kvslim.cache.recipe",
    "MLA": "kvslim.nn.mla",
    "DSA": "kvslim.nn.dsa",
    "V4Attention": "kvslim.nn.v4_attention",
    "V4Config": "kvslim.nn.v4_config",
    "from_transformers": "kvslim.nn.loading",
    "ArchSpec": "kvslim.plan.spec",
    "preset": "kvslim.plan.presets",
    "from_config": "kvslim.plan.spec_hf",
    "bytes_per_vector": "kvslim.formats",
    "vectors_nbytes": "kvslim.formats",
    "kv_bytes": "kvslim.plan",
    "kv_breakdown": "kvslim.plan",
    "decode_flops": "kvslim.plan",
    "decode_read_bytes": "kvslim.plan",
    "prefill_flops": "kvslim.plan",
    "fit": "kvslim.plan",
    "expected_cache_bytes": "kvslim.plan",
    "make_codec": "kvslim.quant",
    "CODEC_NAMES": "kvslim.quant",
    "Grid": "kvslim.eval",
    "run_grid": "kvslim.eval",
    "build_report": "kvslim.eval",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


# subpackages and modules reachable as attributes after a plain ``import kvslim`` (imported on first access)
SUBMODULES = ("cache", "cli", "errors", "eval", "formats", "generation", "hf_config", "memory", "models", "nn", "plan",
              "quant", "testing")  # fmt: skip

__getattr__, __dir__ = lazy_exports("kvslim", _EXPORTS, globals(), SUBMODULES)
