"""Compression recipes: the grammar, the lookup of registered methods, and named presets.

A recipe is ``METHOD[:key=value,...][+CODEC]``, for example::

    full                      every token exact (a DynamicCache equivalent)
    window:w=256,sinks=4      StreamingLLM: the first 4 tokens and the last 256 (older ones are dropped)
    blocks:m=4,k=32,w=128     CSA-like: tokens leaving the window pooled 4 to 1, top-32 blocks per query
    v4+tq3                    any method, entries stored in a storage format of kvslim.formats

Methods, their parameters and checks live one per file in :mod:`kvslim.cache.methods` (``kvslim recipes`` lists
them); codecs are the formats of :mod:`kvslim.formats`. ``full_first=n`` (any method) keeps the first n global
(full-attention) layers exact. Presets are recipe strings under a short name. ``parse_recipe`` validates everything
it can without a model; ``kvslim.make_cache`` checks what needs the model before allocating anything.
``canonical(text)`` is the one string of a recipe (``v4-tq3``, ``v4+tq3`` and ``v4:w=128+tq3`` are all ``v4+tq3``);
``identity(text)`` is that string less the parameters of :data:`PLACEMENT` (where bytes live, not what is computed:
``recall:store=disk`` and ``recall`` are one computation), the key results stores and reports use.

A recipe is parsed once, at the edge (the CLI, ``make_cache``, the harness grid), and travels as a :class:`Recipe`;
every function here takes either. ``parse_recipes(text)`` reads a list (``--recipes``) with the same parser.
``resolve(recipe, shape)`` is the one step from a recipe to a model: one layer spec per layer and the reasons the
recipe cannot run there; building (:func:`kvslim.cache.build.make_cache`), checking, predicting bytes and pricing
(:func:`kvslim.plan.pricing.price_recipe`) all go through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput
from ..formats import REGISTRY, codec_formats
from .base import LayerSpec
from .method import Method, ModelShape, check_value, methods

__all__ = ["CODECS", "KINDS", "PLACEMENT", "PRESETS", "LayerSpec", "Recipe", "Resolved", "canonical", "identity",
           "list_recipes", "parse_recipe", "parse_recipes", "placement", "read_back", "resolve", "split_recipe_list"]

#: Parameters that say where a cache's bytes live, not what it computes: recall's cold tier in RAM or on disk
#: (``store``) and the disk folder (``dir``). They stay in :func:`canonical` (what to run) and are left out of
#: :func:`identity` (what a results store or report keys a row by), so one computation is one row.
PLACEMENT: frozenset[str] = frozenset({"store", "dir"})



class _Codecs(Mapping):
    """Storage codecs: name -> description, read live from :mod:`kvslim.formats` (``none``: the model's dtype)."""

    def __getitem__(self, name: str) -> str:
        if name == "none":
            return "model dtype, lossless"
        if name not in codec_formats("gqa"):
            raise KeyError(name)
        return REGISTRY[name].description

    def __iter__(self) -> Iterator[str]:
        return iter(("none", *codec_formats("gqa")))

    def __len__(self) -> int:
        return 1 + len(codec_formats("gqa"))


CODECS: Mapping[str, str] = _Codecs()



class _Kinds(Mapping):
    """method -> (one-line description, {parameter: (type, default, meaning)}), read live from the registry."""

    def __getitem__(self, name: str) -> tuple[str, dict[str, tuple[type, Any, str]]]:
        cls = methods()[name]
        return cls.summary, cls.Params.spec()

    def __iter__(self) -> Iterator[str]:
        return iter(methods())

    def __len__(self) -> int:
        return len(methods())


KINDS: Mapping[str, tuple[str, dict[str, tuple[type, Any, str]]]] = _Kinds()
_COMMON: dict[str, tuple[type, Any, str]] = {"full_first": (int, 0, "keep the first n global (full-attention) layers exact")}

# named presets: name -> (recipe text, description)
PRESETS: dict[str, tuple[str, str]] = {
    "stream": ("window:w=256,sinks=4", "StreamingLLM: 4 sinks + 256 recent tokens"),
    "csa": ("blocks:m=4,k=32,w=128", "CSA-like 4:1 pooling with top-32 block selection"),
    "hca": ("heavy:m=64,w=128", "HCA-like 64:1 pooling, dense over entries"),
    "v4-fp8": ("v4+fp8", "V4 interleave with FP8 entries (DeepSeek's production format)"),
    "v4-tq3": ("v4+tq3", "V4 interleave with 3-bit TurboQuant entries"),
    "latent32": ("latent:r=32", "rank-32 latent keys and values (half of SmolLM2's head dim, 1/8 of Gemma 3's)"),
    "full-kivi2": ("full+kivi2", "every token kept, KIVI 2-bit"),
    "recall-fp8": ("recall:k=12,pin=4,span=2+fp8", "tiered: FP8 bbox summaries per 32 tokens + 128 exact recent "
                   "tokens hot, every token exact in a cold tier; 12 blocks fetched per query and KV head: the 4 the "
                   "prompt's last token attends most, each with the block after it, and 4 by summary"),
    "full-kivi4": ("full+kivi4", "every token kept, KIVI 4-bit"),
    "full-tq4": ("full+tq4", "every token kept, 4-bit TurboQuant"),
    "full-tq3": ("full+tq3", "every token kept, 3-bit TurboQuant"),
    "full-fp8": ("full+fp8", "every token kept, FP8 e4m3"),
}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``params`` holds every parameter of ``kind`` (defaults filled in), sorted by name."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()
    codec: str = "none"
    full_first: int = 0
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        cls = methods().get(self.kind)
        if cls is None:
            raise InvalidInput(f"unknown recipe {self.kind!r}; known: {', '.join([*KINDS, *PRESETS])}")
        if self.codec not in CODECS:
            raise InvalidInput(f"unknown storage codec {self.codec!r}; known: {', '.join(CODECS)}")
        p = dict(self.params)
        for key in p:
            if key not in KINDS[self.kind][1]:
                raise InvalidInput(f"recipe {self.kind!r} has no parameter {key!r}; valid keys: {_valid_keys(self.kind)}")
        check_value("", "full_first", self.full_first, 0, {"lo": 0})
        object.__setattr__(self, "_method", cls(cls.Params(**p), self.codec))  # validates every parameter
        full = {k: getattr(self.method.params, k) for k in KINDS[self.kind][1]}
        object.__setattr__(self, "params", tuple(sorted(full.items())))

    @property
    def method(self) -> Method:
        """The configured method object (what the cache and the planner use)."""
        return self._method  # type: ignore[attr-defined]

    def get(self, key: str) -> Any:
        return dict(self.params)[key]

    def __str__(self) -> str:
        return self._text(placement=True)

    def _text(self, placement: bool, keep: frozenset[str] = frozenset()) -> str:
        params = self.method.Params
        defaults = params.record_defaults()
        parts = [f"{k}={v}" for k, v in self.params
                 if (k in keep or defaults.get(k) != v) and (placement or k not in PLACEMENT)]  # fmt: skip
        if params.recorded and not keep:  # a value at its recorded default that today's default would change
            again = dict(parse_recipe(self._text(placement, frozenset({""}))).params)
            differ = frozenset(k for k, v in self.params if again[k] != v)
            if differ:
                return self._text(placement, differ)
        if self.full_first:
            parts.append(f"full_first={self.full_first}")
        text = self.kind + (":" + ",".join(parts) if parts else "")
        return text + (f"+{self.codec}" if self.codec != "none" else "")

    def layer_specs(self, layer_types: list[str], sliding_window: int | None) -> list[LayerSpec]:
        """One spec per model layer (see :meth:`kvslim.cache.method.Method.layer_specs`)."""
        return self.method.layer_specs(layer_types, sliding_window, self.full_first)


def _valid_keys(kind: str) -> str:
    return ", ".join([*KINDS[kind][1], *_COMMON])


def _convert(kind: str, key: str, raw: str) -> Any:
    typ = KINDS[kind][1][key][0] if key in KINDS[kind][1] else _COMMON[key][0]
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise InvalidInput(f"{kind}: {key} must be an integer, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise InvalidInput(f"{kind}: {key} must be a number, got {raw!r}") from None
    return raw


def _with_params(expansion: str, arg_text: str, codec: str = "") -> str:
    """A preset's expansion with ``arg_text``'s ``key=value`` tokens put in (for the message refusing
    ``PRESET:key=value[+codec]``): ``blocks:m=4,k=32,w=128`` + ``m=2`` -> ``blocks:m=2,k=32,w=128``."""
    structure, _plus, own = expansion.partition("+")
    codec = codec or own
    kind, _colon, base_args = structure.partition(":")
    params = dict(t.partition("=")[::2] for t in base_args.split(",") if t)
    params.update(dict(t.strip().partition("=")[::2] for t in arg_text.split(",") if t.strip()))
    args = ",".join(f"{k}={v}" if v else k for k, v in params.items())
    return kind + (":" + args if args else "") + (f"+{codec}" if codec else "")


def parse_recipe(text: str | Recipe) -> Recipe:
    """Parse ``METHOD[:key=value,...][+CODEC]`` or a preset name into a validated :class:`Recipe`.

    Raises ``InvalidInput`` naming the bad token and listing what is valid there.
    """
    if isinstance(text, Recipe):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("empty recipe: give e.g. 'full', 'window:w=256,sinks=4' or 'v4+tq3' (see `kvslim recipes`)")
    raw = text.strip()
    if raw in PRESETS:
        return parse_recipe(PRESETS[raw][0])
    structure, plus, codec = raw.partition("+")
    codec = codec.strip() if plus else "none"
    if plus and not codec:
        raise InvalidInput(f"recipe {raw!r} ends with '+': name a codec ({', '.join(CODECS)})")
    if codec not in CODECS:
        raise InvalidInput(f"unknown storage codec {codec!r} in {raw!r}; valid codecs: {', '.join(CODECS)}")
    name, colon, arg_text = structure.partition(":")
    name = name.strip()
    if name in PRESETS:
        base = parse_recipe(PRESETS[name][0])
        expansion = PRESETS[name][0]
        if colon:
            raise InvalidInput(f"preset {name!r} takes no parameters: it names {expansion} (method {base.kind!r}); "
                               f"write the method with your parameters, e.g. {_with_params(expansion, arg_text, codec if plus else '')}"
                               f" (valid keys for {base.kind}: {_valid_keys(base.kind)})")
        if plus and base.codec != "none" and codec != base.codec:
            raise InvalidInput(f"preset {name!r} already stores its entries as {base.codec} (it names {expansion}); "
                               f"'+{codec}' would replace that codec: write {str(base).rsplit('+', 1)[0]}+{codec} "
                               f"for {codec} entries")
        return Recipe(base.kind, base.params, codec if plus else base.codec, base.full_first, text=raw)
    if name not in KINDS:
        raise InvalidInput(f"unknown recipe {name!r} in {raw!r}; valid names: {', '.join([*KINDS, *PRESETS])}")
    params: dict[str, Any] = {}
    full_first = 0
    if colon:
        if not arg_text.strip():
            raise InvalidInput(f"recipe {raw!r} has ':' but no parameters; valid keys: {_valid_keys(name)}")
        for token in arg_text.split(","):
            key, eq, value = (s.strip() for s in token.partition("="))
            if not eq or not key or not value:
                raise InvalidInput(f"bad token {token.strip()!r} in {raw!r}: expected key=value; valid keys: {_valid_keys(name)}")
            if key not in KINDS[name][1] and key not in _COMMON:
                raise InvalidInput(f"unknown key {key!r} in {raw!r}; valid keys for {name}: {_valid_keys(name)}")
            if key in params or (key == "full_first" and full_first):
                raise InvalidInput(f"key {key!r} given twice in {raw!r}")
            if key == "full_first":
                full_first = _convert(name, key, value)
            else:
                params[key] = _convert(name, key, value)
    return Recipe(name, tuple(params.items()), codec, full_first, text=raw)


def split_recipe_list(text: str) -> list[str]:
    """The recipe texts of a list (``kvslim niah --recipes``), unparsed: ``;``-separated when the text holds a ``;``,
    else comma-separated where an item that is only ``key=value`` (no method name) continues the previous recipe's
    parameters, so ``full,blocks:m=4,k=32,w=128`` is ``["full", "blocks:m=4,k=32,w=128"]``."""
    if ";" in text:
        return [t.strip() for t in text.split(";")]
    items: list[str] = []
    for part in text.split(","):
        item = part.strip()
        head = item.split("=", 1)[0]
        if items and items[-1] and "=" in item and ":" not in head and "+" not in head:
            items[-1] += "," + item
        elif "=" in item and ":" not in head:
            raise InvalidInput(f"--recipes: {item!r} is a parameter without a recipe before it: write NAME:{item}")
        else:
            items.append(item)
    return items


def parse_recipes(text: str) -> list[Recipe]:
    """The recipes of a list (``kvslim niah --recipes``, split by :func:`split_recipe_list`), each read by
    :func:`parse_recipe`."""
    return [_list_item(t) for t in split_recipe_list(text)]


def _list_item(text: str) -> Recipe:
    if not text.strip():
        raise InvalidInput("empty recipe name in --recipes: separate names with single commas")
    return parse_recipe(text)


@dataclass(frozen=True)
class Resolved:
    """A recipe resolved against a model shape (:func:`resolve`): one spec per model layer, and ``reasons``: why the
    recipe cannot run on that shape (one line each; empty when it can)."""

    recipe: Recipe
    shape: ModelShape
    specs: tuple[LayerSpec, ...]
    reasons: tuple[str, ...] = ()

    def require(self) -> list[LayerSpec]:
        """The layer specs; raises ``InvalidInput`` with the first reason when there is one."""
        if self.reasons:
            raise InvalidInput(self.reasons[0])
        return list(self.specs)


def resolve(recipe: str | Recipe, shape: ModelShape, where: str = "the model") -> Resolved:
    """``recipe`` on a model of ``shape`` (``where`` names the model in reasons): its layer specs
    (:meth:`Recipe.layer_specs`) and the reasons it cannot run there: ``full_first`` beyond the layers, and each
    reason of its method's :meth:`~kvslim.cache.method.Method.check`. A layer type kvslim caches do not support
    raises ``InvalidInput``."""
    r = parse_recipe(recipe)
    n = len(shape.layer_types)
    reasons = [f"full_first={r.full_first} exceeds {where}'s {n} layers"] if r.full_first > n else []
    specs = r.layer_specs(list(shape.layer_types), shape.sliding_window)
    reasons += [f"recipe {r}: {why}" for why in r.method.check(shape)]
    return Resolved(r, shape, tuple(specs), tuple(reasons))


def chunk_invariant(text: str | Recipe, chunk: int = 0) -> bool:
    """Whether a cache of this recipe gives the same results whether a prompt comes in one call or in chunks (to
    float rounding): its method's ``chunk_invariant`` (checked for every method by the contract test) and its
    storage format's (``kvslim.formats``: KIVI groups tokens, so it is not). With ``chunk``, in calls of that many
    tokens: recall's dense prefill needs two or more (``Method.min_prefill_chunk``: a one-token call is a decode
    step)."""
    r = parse_recipe(text)
    if not r.method.chunk_invariant or 0 < chunk < r.method.min_prefill_chunk:
        return False
    return r.codec == "none" or REGISTRY[r.codec].chunk_invariant


def shares_context_prefill(text: str | Recipe) -> bool:
    """Whether a cache of this recipe attends over the whole first call at model precision and compresses only
    after it (its method declares ``shares_context_prefill``: the eviction baselines), so that its context prefill
    computes what any other such recipe's computes and may be replayed from it (:mod:`kvslim.eval.harness.share`)."""
    return bool(parse_recipe(text).method.shares_context_prefill)


def canonical(text: str | Recipe) -> str:
    """The canonical string of a recipe: parameters at their defaults omitted (a default changed since records were
    written: at its recorded one, ``Params.recorded``), the rest sorted; a preset is its
    expansion (``v4-tq3`` and ``v4+tq3`` are one recipe). Results stores and reports key recipes by its
    :func:`identity` (without the :data:`PLACEMENT` parameters)."""
    return str(parse_recipe(text))


def identity(text: str | Recipe) -> str:
    """What a recipe computes: :func:`canonical` less the :data:`PLACEMENT` parameters (``recall:store=disk`` and
    ``recall:dir=/x,store=disk`` are ``recall``). Results stores and reports key recipes by it: one row per
    computation, however its bytes were placed."""
    return parse_recipe(text)._text(placement=False)


def read_back(text: str) -> str:
    """The :func:`identity` of a recipe string read back from a record. Stored strings are canonical, written
    when they were stored: a parameter they leave out was at its default *then*, so a default changed since
    (``Params.recorded``) is put back before parsing (a stored ``recall`` is ``recall:k=8,pin=0,span=1``, not
    today's defaults). Presets name their parameters and are read as they are."""
    structure, plus, codec = text.strip().partition("+")
    name, _colon, args = structure.partition(":")
    name = name.strip()
    if name in PRESETS or name not in KINDS:
        return identity(text)
    given = {t.partition("=")[0].strip() for t in args.split(",") if t.strip()}
    missing = [f"{k}={v}" for k, v in methods()[name].Params.recorded.items() if k not in given]
    if not missing:
        return identity(text)
    return identity(name + ":" + ",".join([t for t in args.split(",") if t.strip()] + missing) + plus + codec)


def placement(text: str | Recipe) -> str:
    """The :data:`PLACEMENT` parameters of a recipe that differ from their defaults, as ``key=value,...`` ("" for
    none): what :func:`identity` leaves out (records note it as ``placement``)."""
    r = parse_recipe(text)
    defaults = methods()[r.kind].Params.record_defaults()
    return ",".join(f"{k}={v}" for k, v in r.params if k in PLACEMENT and defaults.get(k) != v)


def list_recipes() -> list[dict[str, Any]]:
    """Every method and preset: ``{"name", "description", "parameters", "recipe"}`` (parameters as
    ``{key: "default - meaning"}``), then the codecs as ``+name`` entries."""
    out: list[dict[str, Any]] = []
    for kind, (desc, spec) in KINDS.items():
        params = {k: f"{d} - {doc}" for k, (_t, d, doc) in {**spec, **_COMMON}.items()}
        out.append({"name": kind, "description": desc, "parameters": params, "recipe": kind})
    for name, (text, desc) in PRESETS.items():
        out.append({"name": name, "description": desc, "parameters": {}, "recipe": text})
    for name, desc in CODECS.items():
        if name != "none":
            out.append({"name": f"+{name}", "description": f"storage codec: {desc}", "parameters": {}, "recipe": f"full+{name}"})
    return out
