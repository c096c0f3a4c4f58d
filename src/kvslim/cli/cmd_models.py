"""``kvslim models``: the embedded models, their architecture and whether they are installed."""

from __future__ import annotations

import typer
from rich.table import Table

from ._common import console, one_line_errors, print_json, spinner


def register(app: typer.Typer) -> None:
    @app.command("models")
    @one_line_errors
    def models_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        hf_folder: str = typer.Option(
            None, "--hf-folder", metavar="NAME",
            help="Print only the plain safetensors folder of embedded model NAME (written on first use), the folder "
            "vLLM loads (docs/vllm.md).",
        ),
    ) -> None:
        """List the embedded models with their architecture, licence and whether they are installed.

        Columns: layers, query/KV heads, head dim, max context, attention kind per layer, licence, installed (or the
        command that installs it).

        Facts come from the model's cached config once it has been loaded, else from kvslim's preset of it."""
        from ..models import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_facts, is_installed

        if hf_folder is not None:
            from ..models import hf_folder as folder_of

            with spinner(f"writing {hf_folder}'s safetensors folder", enabled=not as_json) as say:
                folder = folder_of(hf_folder, status=say)
            if as_json:
                print_json({"model": hf_folder, "folder": str(folder)})
            else:
                typer.echo(str(folder))
            return
        rows = []
        with spinner("reading model headers", enabled=not as_json):
            for name, spec in EMBEDDED_MODELS.items():
                installed = is_installed(name)
                facts = embedded_facts(name)
                rows.append(
                    {
                        "name": name,
                        "default": name == DEFAULT_MODEL,
                        "title": spec.title,
                        "license": spec.license,
                        "installed": installed,
                        "install": spec.install_command,
                        **({"facts": facts.to_dict()} if facts else {}),
                    }
                )
        if as_json:
            print_json({"models": rows})
            return
        table = Table(title="Embedded models", show_lines=False)
        for col in ("model", "layers", "q heads", "kv heads", "head dim", "max ctx", "attention per layer", "licence", "installed"):
            table.add_column(col, justify="right" if col in {"layers", "q heads", "kv heads", "head dim", "max ctx"} else "left")
        for r in rows:
            f = r.get("facts")
            name = r["name"] + (" (default)" if r["default"] else "")
            if f:
                cells = [str(f["layers"]), str(f["query_heads"]), str(f["kv_heads"]), str(f["head_dim"]), f"{f['max_context']:,}", f["kinds_summary"]]
            else:
                cells = ["-"] * 6
            table.add_row(name, *cells, r["license"], "yes" if r["installed"] else f"no: {r['install']}")
        console.print(table)
