"""recall at its edges (issue 25): every prompt token in the sinks, cold files and closed caches, corrupted cold
rows, stale temporary folders."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvslim.cache import make_cache
from kvslim.testing import tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(), "gemma3": tiny_gemma3()}


def _greedy(model, ids, cache, n=6):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              cache=cache, pad_token_id=0)  # fmt: skip


def _ids(n=45, b=1, seed=1):
    return torch.randint(1, 128, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("opts", ["sinks=40", "sinks=40,prefill=select", "sinks=6", "sinks=40,store=disk"])
def test_prompt_wholly_in_the_sinks(models, arch, opts):
    """sinks >= prompt tokens: the prefill has no tail yet (was a TypeError in _prefill); exact like full."""
    model = models[arch]
    ids = _ids(6)
    ref = _greedy(model, ids, DynamicCache(config=model.config))
    cache = make_cache(model, f"recall:{opts}")
    try:
        assert torch.equal(_greedy(model, ids, cache), ref)
    finally:
        cache.close()


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_closed_cache_reports_no_cold_bytes_and_refuses_a_forward(models, store):
    """After close(): tier_nbytes() said the cold bytes were still held and the next forward raised a bare
    TypeError (ram) or a ColdTierError after the first layers had stored the token (disk)."""
    from kvslim.errors import ColdTierError, InvalidInput

    model = models["llama"]
    cache = make_cache(model, f"recall:m=4,w=8,sinks=2,k=1,store={store}")
    ids = _ids()
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    assert cache.tier_nbytes()["cold"] > 0
    seen = cache.get_seq_length()
    cache.close()
    assert cache.tier_nbytes()["cold"] == 0 and cache.tier_nbytes()["fetched"] == 0
    with pytest.raises(InvalidInput, match="cache was closed"), torch.inference_mode():
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert [layer.get_seq_length() for layer in cache.layers] == [seen] * len(cache.layers)  # nothing stored
    with pytest.raises(ColdTierError, match="released by cache.close"):  # a stream used directly: named, one line
        cache.layers[0].cold_k.read(0, 1)
    cache.close()  # twice: harmless


def _corrupt(stream, finite: bool) -> None:
    """Overwrite the stream's rows in place: random bytes, or (``finite``) a valid but different row (the rows of
    token 0 copied over every token: decodes to finite values, a wrong answer unless caught)."""
    import os

    n_bytes, token = stream.nbytes(), stream.nbytes() // stream.n
    if stream.file is not None:
        with open(stream.path, "r+b") as f:
            first = f.read(token)
            f.seek(0)
            f.write(first * stream.n if finite else os.urandom(n_bytes))
    else:
        with torch.inference_mode():  # the rows were made under inference mode
            stream.rows[: stream.n] = stream.rows[:1].clone() if finite else torch.randint(
                0, 256, stream.rows[: stream.n].shape, dtype=torch.uint8)  # fmt: skip


@pytest.mark.parametrize("store", ["disk", "ram"])
@pytest.mark.parametrize("finite", [False, True])
@pytest.mark.parametrize("prefill", ["dense", "select"])
def test_changed_cold_bytes_fail_their_checksum_naming_the_file(models, store, finite, prefill):
    """Random bytes in a live cold file gave "fp16: input has non-finite values" (no file named) and finite garbage
    a wrong answer: every row has a checksum, checked on every fetch (decode) and read (dense prefill)."""
    from kvslim.errors import ColdTierError

    model = models["llama"]
    cache = make_cache(model, f"recall:m=4,w=8,sinks=2,k=1,store={store},cold=fp16,prefill={prefill}")
    ids = _ids()
    try:
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True)
        stream = cache.layers[1].cold_v
        _corrupt(stream, finite)
        where = str(stream.path) if store == "disk" else "cold stream layer1.v (RAM)"
        for step in (ids[:, :1], ids[:, :5]):  # a decode step fetches, a multi-token call reads densely (or selects)
            with pytest.raises(ColdTierError, match="rows read fail their checksum") as err, torch.inference_mode():
                model(input_ids=step, cache=cache, use_cache=True)
            assert where in str(err.value) and "\n" not in str(err.value)
    finally:
        cache.close()


def test_cli_generate_with_more_sinks_than_prompt_tokens(tiny_model_dir):
    """The issue's command on the tiny model: ``kvslim generate "..." -n 4 -r 'recall:sinks=40'`` (was a TypeError
    traceback)."""
    from typer.testing import CliRunner

    from kvslim.cli import app

    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "-n", "4", "--no-chat",
                                   "-r", "recall:sinks=40", "w3 w4"])  # fmt: skip
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
