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
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate (greedy)."),
        chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Force the chat template on or off (default: use it when present)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    ) -> None:
        """Answer PROMPT greedily; print the answer, tokens/s and the KV-cache bytes held at the end."""
        from ..errors import InvalidInput
        from ..generation import generate
        from ..models import load

        if not prompt.strip():
            raise InvalidInput("the prompt is empty: give some text to continue or answer")
        if max_new_tokens <= 0:
            raise InvalidInput(f"--max-new-tokens must be positive, got {max_new_tokens}")
        with spinner(f"loading {model}", enabled=not as_json) as status:
            mdl, tok = load(model, status=status)
            status(f"generating up to {max_new_tokens} tokens")
            res = generate(mdl, tok, prompt, max_new_tokens=max_new_tokens, chat=chat)
        if as_json:
            print_json({"model": model, **res.to_dict()})
            return
        console.print(res.text, highlight=False, markup=False)
        console.print(
            f"[dim]{res.new_tokens} tokens in {res.seconds:.2f} s ({res.tokens_per_s:.1f} tokens/s, prefill included); "
            f"prompt {res.prompt_tokens} tokens; KV cache held: {fmt_bytes(res.kv_bytes)} ({res.kv_bytes:,} B)[/]"
        )
