import pytest
import torch
from transformers import DynamicCache

from kvslim.memory import cache_nbytes


@pytest.mark.parametrize("n", [1, 7, 33])
def test_dynamic_cache_bytes_are_tensor_bytes(tiny_llama, n):
    cache = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(torch.arange(n)[None] % 100, cache=cache)
    # 2 layers x (K and V) x 2 KV heads x 16 dims x n tokens x 4 bytes (float32)
    assert cache_nbytes(cache) == 2 * 2 * 2 * 16 * n * 4


def test_sliding_layers_hold_only_their_window(tiny_gemma3):
    cache = DynamicCache(config=tiny_gemma3.config)
    with torch.no_grad():
        tiny_gemma3(torch.arange(40)[None], cache=cache)
    per_token = 2 * 1 * 16 * 4  # K and V, 1 KV head, head dim 16, float32
    held = [layer.keys.shape[-2] for layer in cache.layers]
    assert held[3] == 40 and max(held[:3]) < 40  # the full layer keeps all, sliding layers only their window
    # + transformers' int64 window-size scalar that each sliding layer keeps as a tensor
    assert cache_nbytes(cache) == per_token * sum(held) + 3 * 8


def test_object_with_own_nbytes_is_trusted():
    class C:
        def nbytes(self):
            return 123

    assert cache_nbytes(C()) == 123
    assert cache_nbytes(None) == 0
    with pytest.raises(TypeError):
        cache_nbytes(object())
