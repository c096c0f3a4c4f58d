"""``kvslim generate``: greedy generation with a real model, reporting speed and KV bytes held."""

from __future__ import annotations

import typer

from ._common import console, fmt_bytes, one_line_errors, print_json, spinner


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @one_line_errors
    def generate_cmd(
        prompt: str = typer.Argument(..., help="The prompt (the chat template is applied when the model has one)."),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="Embedded model name, local HF folder or .gguf file."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate (greedy), >= 1."),
        chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Force the chat template on or off (default: use it when present)."),
        recipe: str = typer.Option(
            None, "--recipe", "-r",
            help="KV-cache recipe, e.g. full, window:w=256,sinks=4, v4+tq3 (see `kvslim recipes`); default: a stock DynamicCache.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    ) -> None:
        """Answer PROMPT greedily; print the answer, tokens/s and the KV-cache bytes held at the end.

        The bytes are measured from the cache's tensors; their ratio to a 16-bit full cache of the same tokens is computed
        exactly from the model config and the token count. --recipe picks a compressed cache (see `kvslim recipes`);
        a tiered recipe (recall) also reports its cold bytes and the cold bytes fetched per decode step."""
        from ..cache import make_cache
        from ..cache.recipe import parse_recipe
        from ..errors import InvalidInput
        from ..generation import generate
        from ..models import load
        from ..paths import check_text
        from ..units import check_int

        parsed = parse_recipe(recipe) if recipe is not None else None  # refuse a malformed recipe before loading
        check_text(prompt, "the prompt")
        if not prompt.strip():
            raise InvalidInput("the prompt is empty: give some text to continue or answer")
        check_int(max_new_tokens, "--max-new-tokens")
        with spinner(f"loading {model}", enabled=not as_json) as status:
            mdl, tok = load(model, status=status)
            status(f"generating up to {max_new_tokens} tokens")
            cache = make_cache(mdl, parsed, tokenizer=tok) if parsed is not None else None
            res = generate(mdl, tok, prompt, max_new_tokens=max_new_tokens, chat=chat, cache=cache)
        label = str(parsed) if parsed is not None else "stock DynamicCache"
        if as_json:
            print_json({"model": model, "recipe": label, **res.to_dict()})
            return
        console.print(res.text, highlight=False, markup=False)
        console.print(
            f"[dim]{res.new_tokens} tokens in {res.seconds:.2f} s ({res.tokens_per_s:.1f} tokens/s, prefill included); "
            f"prompt {res.prompt_tokens} tokens; KV cache held ({label}): {fmt_bytes(res.kv_bytes)} ({res.kv_bytes:,} B), "
            f"{res.kv_ratio:.3f}x a 16-bit full cache of the same {res.kv_tokens} tokens "
            f"({fmt_bytes(res.kv_full16_bytes)}, computed from the config)[/]"
        )
        if res.kv_cold_bytes:
            console.print(
                f"[dim]tiers: hot {fmt_bytes(res.kv_bytes)} (above), cold {fmt_bytes(res.kv_cold_bytes)} "
                f"({res.kv_cold_bytes:,} B); the last decode step fetched {fmt_bytes(res.kv_fetched_last_step)} "
                f"({res.kv_fetched_last_step:,} B) from the cold tier[/]"
            )
