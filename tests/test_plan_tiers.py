"""The tiered-cache planner: hot / cold / fetched bytes, decode-step time, what fits."""

from __future__ import annotations

import pytest

from kvslim.errors import InvalidInput
from kvslim.plan import GiB, fit
from kvslim.plan_tiers import RecallPlan, decode_step_time, fit_tiered, recall_bytes
from kvslim.presets import get_preset


def test_short_context_is_all_hot_and_exact():
    s = get_preset("smollm2-135m")
    b = recall_bytes(s, 100, RecallPlan(window_fmt="bf16"))
    assert b["cold"] == 0 and b["fetched"] == 0 and b["hot"] == b["full16"]


def test_bytes_follow_the_contract():
    s = get_preset("llama-3.1-8b")
    p = RecallPlan(m=32, k=8, w=128, sinks=4, summary="bbox", summary_fmt="fp8", cold_fmt="bf16")
    n = 4 + 128 + 32 * 100 + 5  # 100 blocks out; 4 sinks + 133 exact
    b = recall_bytes(s, n, p)
    per_layer_hot = 8 * (137 * 2 * 256 + 100 * 2 * (128 + 4))
    assert b["hot"] == 32 * per_layer_hot
    assert b["cold"] == 32 * 8 * 3200 * 2 * 256
    assert b["fetched"] == 32 * 8 * 256 * 2 * 256 and b["fetched_tokens"] == 256
    everything = recall_bytes(s, n, RecallPlan(k=100))
    assert everything["fetched"] == everything["cold"]


def test_llama_128k_fits_more_sequences_than_full_caches():
    s = get_preset("llama-3.1-8b")
    n = 131072
    tiered = fit_tiered(s, n, 141 * GiB, 2048 * GiB)
    assert tiered["sequences"] > fit(s, n, 141 * GiB, "tq4")["sequences"] > fit(s, n, 141 * GiB, "bf16")["sequences"]
    t = decode_step_time(s, n, 8)
    assert t["serial_s"] >= t["overlapped_s"] > 0 and t["link_bytes"] > 0
    assert decode_step_time(s, n, 8, cache="full")["link_bytes"] == 0


def test_refuses_bad_plans():
    with pytest.raises(InvalidInput):
        RecallPlan(m=0)
    with pytest.raises(InvalidInput):
        RecallPlan(cold_fmt="fp7")
    with pytest.raises(InvalidInput):
        recall_bytes(get_preset("deepseek-v3"), 1000)
