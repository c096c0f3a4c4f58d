"""The tiered-cache planner: hot / cold / fetched bytes, decode-step time, what fits, and `kvslim plan --gpu`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvslim.cli import app
from kvslim.errors import InvalidInput
from kvslim.plan import GiB, fit
from kvslim.plan.presets import get_preset
from kvslim.plan.tiers import GPUS, fit_tiers, get_gpu, step_time, tier_price

RECALL = "recall:m=32,k=8,w=128,sinks=4,pin=0+fp8"  # no pins (the defaults pin 4 blocks)


def test_short_context_is_all_hot_and_nothing_is_fetched():
    p = tier_price(get_preset("smollm2-135m"), RECALL, 100)
    assert p["cold"] == 0 and p["fetched"] == 0 and p["hot"] == p["kv_bytes"] > 0
    assert tier_price(get_preset("smollm2-135m"), "full+tq4", 5000)["cold"] == 0  # one tier: nothing cold


def test_bytes_follow_the_contract():
    s = get_preset("llama-3.1-8b")  # 32 layers x 8 KV heads x dim 128, bf16
    n = 4 + 128 + 32 * 100 + 5  # 100 blocks out of the window of the next query
    p = tier_price(s, RECALL, n)
    nb = (n - 128 + 1 - 4) // 32
    exact = n - nb * 32
    summaries = 8 * nb * 2 * (128 + 4)  # bbox: 2 fp8 vectors per block and KV head, 4 scale bytes each
    side = exact + nb  # validity flags of the exact tokens and the blocks
    assert p["hot"] == 32 * (8 * exact * 2 * 2 * 128 + summaries + side)
    assert p["cold"] == 32 * 8 * nb * 32 * 2 * 2 * 128  # exact bf16 K and V of every block
    assert p["fetched"] == 32 * 8 * 8 * 32 * 2 * 2 * 128  # top-8 blocks of 32 tokens per KV head and layer
    every = tier_price(s, "recall:m=32,k=0,w=128,sinks=4+fp8", n)
    assert every["fetched"] == every["cold"]


def test_llama_128k_fits_more_sequences_than_full_caches():
    s, n, h200 = get_preset("llama-3.1-8b"), 131072, get_gpu("h200")
    tiered = tier_price(s, RECALL, n)
    f = fit_tiers(s, tiered, h200.memory, 2048 * GiB)
    assert f["limit"] == "host" and f["sequences"] == 2048 * GiB // tiered["cold"]
    assert f["sequences"] > fit(s, n, h200.memory, "tq4")["sequences"] > fit(s, n, h200.memory, "bf16")["sequences"]
    assert fit_tiers(s, tiered, h200.memory)["limit"] == "hbm"  # host not limited: the hot tiers fill the GPU
    full = tier_price(s, "full", n)
    assert fit_tiers(s, full, h200.memory)["sequences"] == fit(s, n, h200.memory, "bf16")["sequences"] == 7
    t = step_time(s, tiered, 8, h200)
    assert t["serial_s"] == pytest.approx(t["hbm_s"] + t["link_s"]) and t["overlapped_s"] == max(t["hbm_s"], t["link_s"])
    assert t["link_bytes"] == 8 * tiered["fetched"] and t["link_s"] == pytest.approx(8 * tiered["fetched"] / 55e9)
    assert step_time(s, full, 8, h200)["link_bytes"] == 0


def test_refuses_bad_plans():
    with pytest.raises(InvalidInput, match="unknown GPU"):
        get_gpu("h900")
    with pytest.raises(InvalidInput):
        step_time(get_preset("llama-3.1-8b"), tier_price(get_preset("llama-3.1-8b"), RECALL, 4096), 0, GPUS["h200"])
    with pytest.raises(InvalidInput):
        tier_price(get_preset("deepseek-v3"), RECALL, 1000)


def test_cli_prints_the_cold_tier_and_the_step_time():
    args = ["plan", "llama-3.1-8b", "-c", "128k", "-r", "full+tq4", "-r", RECALL, "--gpu", "h200", "--fit", "--host", "256GiB"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "cold MiB" in res.output and "fetched/step" in res.output and "seqs fit" in res.output
    assert "4.8 TB/s" in res.output and "55 GB/s" in res.output  # the assumed figures are stated
    res = CliRunner().invoke(app, [*args, "--json"])
    rows = {r["recipe"]: r for r in json.loads(res.output)["rows"]}
    assert rows["full"]["fit"]["sequences"] == 7 and rows["full+tq4"]["fit"]["sequences"] == 30
    tiered = rows["recall:k=8,pin=0,span=1+fp8"]  # canonical: it names what today's defaults would change
    assert tiered["fit"]["sequences"] == 256 * GiB // tiered["cold"] and tiered["step"]["batch"] == tiered["fit"]["sequences"]
    plain = CliRunner().invoke(app, ["plan", "llama-3.1-8b", "-c", "4k", "-r", "full+tq4"])
    assert plain.exit_code == 0 and "cold MiB" not in plain.output  # no tiered recipe: no tier columns


@pytest.mark.parametrize("args,match", [
    (["--gpu", "h200"], "give --recipe"),
    (["-r", RECALL, "--gpu", "h900"], "unknown GPU"),
    (["-r", RECALL, "--host", "1TiB"], "only used with --fit"),
    (["-r", RECALL, "--fit"], "needs --memory"),
])
def test_cli_bad_tier_options(args, match):
    res = CliRunner().invoke(app, ["plan", "llama-3.1-8b", "-c", "4k", *args])
    assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("n,share", [(2000, 1 / 8), (4000, 1 / 16), (16000, 1 / 16)])
def test_preset_meets_the_hot_targets_on_smollm2(n, share):
    """The issue's targets for the `recall-fp8` preset: hot bytes <= 1/8 of a 16-bit full cache at 2k tokens and
    <= 1/16 at 4k and beyond, on SmolLM2 as the harness runs it (float32 model: the sinks stay float32)."""
    from kvslim.plan import kv_bytes

    s = get_preset("smollm2-135m")
    assert tier_price(s, "recall-fp8", n, "fp32")["hot"] <= share * kv_bytes(s, n, "bf16", include_state=False)
