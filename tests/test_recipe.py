"""Recipe grammar, presets and refusals (no model needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvslim.cache.recipe import CODECS, KINDS, PRESETS, list_recipes, parse_recipe
from kvslim.errors import InvalidInput


def test_defaults_and_params():
    r = parse_recipe("blocks:m=8,k=16,w=64,pool=norm")
    assert (r.kind, r.get("m"), r.get("k"), r.get("w"), r.get("pool"), r.get("sinks")) == ("blocks", 8, 16, 64, "norm", 4)
    assert parse_recipe("window:w=256,sinks=4") == parse_recipe("window")
    r = parse_recipe("v4+tq3")
    assert (r.kind, r.codec) == ("v4", "tq3")
    assert parse_recipe("heavy:m=64,w=128,full_first=2").full_first == 2


def test_presets_resolve():
    for name, (text, _desc) in PRESETS.items():
        assert parse_recipe(name) == parse_recipe(text)
    assert parse_recipe("stream+fp8").codec == "fp8"


@given(
    kind=st.sampled_from(sorted(KINDS)),
    codec=st.sampled_from(sorted(CODECS)),
    full_first=st.integers(0, 5),
    data=st.data(),
)
def test_round_trip(kind, codec, full_first, data):
    import dataclasses

    from kvslim.cache.method import methods

    params = {}
    meta = {f.name: f.metadata for f in dataclasses.fields(methods()[kind].Params)}
    for key, (typ, _default, _doc) in KINDS[kind][1].items():
        if typ is int and data.draw(st.booleans()):
            if meta[key].get("choices"):
                params[key] = data.draw(st.sampled_from(meta[key]["choices"]))
                continue
            lo = 1 if key in ("m", "hm", "r", "calib", "w", "span") else max(meta[key].get("lo") or 0, 0)
            params[key] = data.draw(st.integers(lo, 200))
    if kind == "recall":  # recall's cross-field rules (refused otherwise, tested there): span needs pin; pin x span <= k
        k, span = params.get("k", 12) or 10**9, params.get("span", 1)  # no pin and no span: auto (never refused)
        if span > 1 and not params.get("pin"):
            params["pin"] = 1
        if params.get("pin", 0) * span > k:
            params["pin"], params["span"] = min(params["pin"], k), 1
        if params.get("pinw") or params.get("hold"):  # rules on pin/span as resolved (auto included)
            rest = {key: v for key, v in params.items() if key not in ("pinw", "hold")}
            got = dict(parse_recipe("recall:" + ",".join(f"{key}={v}" for key, v in rest.items()) if rest
                                    else "recall").params)
            if not got["pin"]:  # pinw places pins: refused without any
                params["pinw"] = 0
            if params.get("hold"):  # hold needs k > 0 and pin x span + hold <= k
                room = got["k"] - got["pin"] * got["span"] if got["k"] else 0
                params["hold"] = max(0, min(params["hold"], room))
    text = kind + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
    if full_first:
        text += ("," if ":" in text else ":") + f"full_first={full_first}"
    text += f"+{codec}" if codec != "none" else ""
    r = parse_recipe(text)
    assert parse_recipe(str(r)) == r


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty recipe"),
        ("blocks:m=0", "m must be positive"),
        ("blocks:m=-2", "m must be positive"),
        ("blocks:q=3", "unknown key 'q'"),
        ("blocks:m=four", "must be an integer"),
        ("blocks:m", "bad token 'm'"),
        ("blockz:m=4", "unknown recipe 'blockz'"),
        ("v4+tq9", "unknown storage codec 'tq9'"),
        ("v4+", "ends with '+'"),
        ("window:", "no parameters"),
        ("window:w=0", "w (window) must be at least 1"),
        ("latent:r=0", "r must be positive"),
        ("blocks:pool=max", "pool must be one of"),
        ("blocks:m=4,m=8", "given twice"),
        ("heavy:k=3", "unknown key 'k'"),
        ("v4:wq=2", "wq must be 0 or 1"),
        ("full:full_first=-1", "full_first must be >= 0"),
    ],
)
def test_bad_recipes_name_the_token(text, needle):
    with pytest.raises(InvalidInput) as err:
        parse_recipe(text)
    assert needle in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(InvalidInput, match="valid keys for blocks: m, k, w, sinks, overlap, pool, wq, full_first"):
        parse_recipe("blocks:x=1")


def test_list_recipes_covers_everything():
    rows = list_recipes()
    names = {r["name"] for r in rows}
    assert set(KINDS) <= names and set(PRESETS) <= names
    assert {f"+{c}" for c in CODECS if c != "none"} <= names
    blocks = next(r for r in rows if r["name"] == "blocks")
    assert set(blocks["parameters"]) == {"m", "k", "w", "sinks", "overlap", "pool", "wq", "full_first"}
    assert all(r["description"] and "\n" not in r["description"] for r in rows)


def test_layer_schedule_gemma_like():
    r = parse_recipe("v4:full_first=1")
    types = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"] * 3
    specs = r.layer_specs(types, 512)
    assert [s.label for s in specs] == ["local", "local", "full", "local", "local", "csa", "hca", "csa"]
    assert specs[0].window == 512 and specs[0].sliding == 512
    specs = parse_recipe("heavy:full_first=2").layer_specs(["full_attention"] * 4, None)
    assert [s.label for s in specs] == ["full", "full", "heavy", "heavy"]
    with pytest.raises(InvalidInput, match="linear_attention"):
        r.layer_specs(["linear_attention"], None)


@pytest.mark.parametrize("text", ["v4-fp8+tq3", "recall-fp8+tq3", "full-kivi2+fp8"])
def test_a_second_codec_on_a_preset_with_its_own_is_refused(text):
    # issue 25, 3.11: 'v4-fp8+tq3' silently became v4+tq3 (the preset's fp8 replaced)
    with pytest.raises(InvalidInput, match=r"already stores its entries as .*would replace that codec"):
        parse_recipe(text)
    assert str(parse_recipe("v4-fp8+fp8")) == "v4+fp8" and str(parse_recipe("stream+fp8")) == "window+fp8"


def test_a_preset_takes_no_parameters():
    # issue 25, 3.16: 'stream:w=10' said "unknown recipe 'stream'" while listing stream among the valid names
    with pytest.raises(InvalidInput) as err:
        parse_recipe("stream:w=10")
    msg = str(err.value)
    assert "preset 'stream' takes no parameters" in msg and "window:w=256,sinks=4" in msg
    assert "window:w=10,sinks=4" in msg and "unknown recipe" not in msg and "\n" not in msg
    with pytest.raises(InvalidInput, match=r"blocks:m=2,k=32,w=128\+fp8"):
        parse_recipe("csa:m=2+fp8")


def test_cli_check_refuses_preset_misuse_in_one_line():
    from typer.testing import CliRunner

    from kvslim.cli import app

    for text, needle in (("v4-fp8+tq3", "already stores its entries as fp8"), ("stream:w=10", "takes no parameters")):
        res = CliRunner().invoke(app, ["recipes", "--check", text])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output


def test_parse_recipes_reads_a_list_with_the_recipe_parser():
    # issue 23, part 2: --recipes is read by the recipe module's parser (it was a second grammar in the CLI)
    from kvslim.cache.recipe import parse_recipes

    got = parse_recipes("full,blocks:m=4,k=32,w=128,v4-tq3")
    assert got == [parse_recipe("full"), parse_recipe("blocks:m=4,k=32,w=128"), parse_recipe("v4+tq3")]
    assert parse_recipes("window:w=64;v4") == [parse_recipe("window:w=64"), parse_recipe("v4")]
    with pytest.raises(InvalidInput, match="parameter without a recipe before it"):
        parse_recipes("w=64,full")
    with pytest.raises(InvalidInput, match="separate names with single commas"):
        parse_recipes("full,,v4")
    with pytest.raises(InvalidInput, match="unknown key 'q'"):
        parse_recipes("blocks:m=4,q=2")


def test_resolve_gives_the_specs_and_the_reasons_every_consumer_uses():
    # issue 23, part 2: one resolve(recipe, shape) serves building, checking, predicting bytes and pricing
    from kvslim.cache.build import predict_nbytes
    from kvslim.cache.method import ModelShape
    from kvslim.cache.recipe import resolve

    shape = ModelShape(("sliding_attention", "full_attention", "full_attention"), 4, 2, 16, 8, "fp32", True, "toy")
    res = resolve("v4:full_first=1", shape)
    assert res.reasons == () and list(res.specs) == parse_recipe("v4:full_first=1").layer_specs(list(shape.layer_types), 8)
    assert res.require() == list(res.specs)
    assert resolve(res.recipe, shape).recipe is res.recipe  # a parsed recipe is not parsed again
    assert resolve("full:full_first=4", shape, "toy").reasons == ("full_first=4 exceeds toy's 3 layers",)
    bad = resolve("latent:r=32", shape)  # rank above the head dim: the method's own check
    assert bad.reasons and bad.reasons[0].startswith("recipe latent:r=32: ")
    with pytest.raises(InvalidInput, match="exceeds the model's head dim 16"):
        bad.require()
    assert len(predict_nbytes(shape, "v4", 100)) == 3
