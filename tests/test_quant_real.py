"""Codecs on real keys and values (SmolLM2-135M, head dim 64): outlier calibration, KIVI's key axis, TurboQuant's
data-oblivious distortion. Slow: loads the embedded model."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

from kvslim.quant import make_codec
from kvslim.quant.codebooks import lloyd_max

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm_kv() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from kvslim.models import load

    model, tok = load("smollm2-135m")
    text = " ".join(list(pydoc_data.topics.topics.values())[:3])
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return [(cache.layers[i].keys[0].float(), cache.layers[i].values[0].float()) for i in (0, 10, 20, 29)]


def rel_err(codec, x: torch.Tensor) -> float:
    return float(((codec.decode(codec.encode(x)) - x) ** 2).sum() / (x**2).sum())


def test_calibrated_outlier_channels_beat_the_default_on_held_out_keys(smollm_kv) -> None:
    for keys, _ in smollm_kv:  # [3 heads, 512 tokens, 64]
        calib, test = keys[:, :256], keys[:, 256:]
        for name in ("tq2.5", "tq3.5"):
            default = rel_err(make_codec(name, 64), test)
            tuned = rel_err(make_codec(name, 64).calibrate(calib), test)
            assert tuned < 0.85 * default, (name, tuned, default)


def test_turboquant_distortion_is_data_oblivious(smollm_kv) -> None:
    for keys, values in smollm_kv:
        for b in (2, 3, 4):
            expected = lloyd_max(b, 64).mse
            for x in (keys, values):
                assert abs(rel_err(make_codec(f"tq{b}", 64), x) - expected) < 0.1 * expected


def test_kivi_keys_per_channel_beat_per_token_on_real_keys(smollm_kv) -> None:
    for keys, _ in smollm_kv:
        per_channel = rel_err(make_codec("kivi2", 64, role="key"), keys)
        per_token = rel_err(make_codec("kivi2", 64, role="value"), keys)
        assert per_channel < 0.5 * per_token
