"""Tiny random-weight models with a byte-level tokenizer, for exercising the whole evaluation offline in seconds.

``tiny_pair("tiny-llama")`` / ``tiny_pair("tiny-gemma3")`` return ``(model, tokenizer)``: the random models of
:mod:`kvslim.testing` sized to a 260-token byte vocabulary (256 bytes + BOS/EOS/PAD + a chat marker), built in code
with the ``tokenizers`` library, nothing downloaded. ``tiny-llama`` has a chat template (like SmolLM2), ``tiny-gemma3``
does not (like the Gemma 3 base model). Their answers are noise: they test the pipeline, not retrieval.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_MODELS", "tiny_tokenizer", "tiny_pair"]

TINY_MODELS = ("tiny-llama", "tiny-gemma3")
_CHAT = (
    "{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ``ByteLevel`` pre-tokenizer emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def tiny_tokenizer(chat: bool = True) -> Any:
    """A byte-level BPE tokenizer without merges: one token per byte, ids 0..255; ``<s>`` 256, ``</s>`` 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_chars().items()}
    specials = ["<s>", "</s>", "<pad>", "<|turn|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|turn|>"])
    if chat:
        fast.chat_template = _CHAT
    return fast


def tiny_pair(name: str, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``tiny-llama`` (chat template) or ``tiny-gemma3`` (base); 4096-token context."""
    from ...errors import InvalidInput
    from ...testing import tiny_gemma3, tiny_llama

    if name not in TINY_MODELS:
        raise InvalidInput(f"unknown tiny model {name!r}: known are {', '.join(TINY_MODELS)}")
    chat = name == "tiny-llama"
    tok = tiny_tokenizer(chat=chat)
    build = tiny_llama if chat else tiny_gemma3
    model = build(seed=seed, vocab_size=len(tok), max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, tok
