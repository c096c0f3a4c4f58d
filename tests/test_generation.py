import pytest

from kvslim.errors import ContextTooLong, InvalidInput
from kvslim.generation import generate
from kvslim.models import load


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir))


def test_greedy_generation_reports_bytes(tiny):
    model, tok = tiny
    res = generate(model, tok, "w1 w2 w3", max_new_tokens=5, chat=False)
    assert res.prompt_tokens == 3
    assert 1 <= res.new_tokens <= 5
    # the cache holds every token but the last generated one: 2 layers x K,V x 2 heads x 16 dims x 4 bytes
    assert res.kv_bytes == 2 * 2 * 2 * 16 * 4 * (res.prompt_tokens + res.new_tokens - 1)
    again = generate(model, tok, "w1 w2 w3", max_new_tokens=5, chat=False)
    assert again.text == res.text  # greedy is deterministic


def test_empty_prompt(tiny):
    with pytest.raises(InvalidInput, match="empty"):
        generate(*tiny, "   ", chat=False)


def test_prompt_longer_than_context_names_both_numbers(tiny):
    model, tok = tiny
    with pytest.raises(ContextTooLong, match=r"70 tokens.*maximum context is 64"):
        generate(model, tok, " ".join(["w5"] * 60), max_new_tokens=10, chat=False)


def test_bad_max_new_tokens(tiny):
    with pytest.raises(InvalidInput, match="positive"):
        generate(*tiny, "w1", max_new_tokens=0, chat=False)


def test_chat_forced_without_template(tiny):
    with pytest.raises(InvalidInput, match="no chat template"):
        generate(*tiny, "w1", chat=True)
