"""``kvslim recipes``: every KV-cache recipe, preset and storage codec with a one-line description and parameters.

``--markdown`` prints the same registries as the README's tables; ``--update FILE`` writes them between the
``BEGIN``/``END`` marker comments in FILE (``tests/test_readme.py`` fails when the README's copy is stale).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import console, one_line_errors, print_json

BEGIN = "<!-- BEGIN generated recipes table -->"
END = "<!-- END generated recipes table -->"


def markdown_tables() -> str:
    """The methods, the presets and the storage formats with their bytes per 128-dim vector, read from the
    registries (parameters and format descriptions: ``kvslim recipes``)."""
    import kvslim
    from kvslim.formats import REGISTRY

    rows = kvslim.list_recipes()
    out = ["| method | what it keeps |", "|---|---|"]
    out += [f"| `{r['name']}` | {r['description']} |" for r in rows if r["recipe"] == r["name"]]
    presets = [f"`{r['name']}` = `{r['recipe']}`" for r in rows if r["recipe"] != r["name"] and not r["name"].startswith("+")]
    out += ["", "Presets: " + ", ".join(presets) + ".", ""]
    codecs = [n for n in REGISTRY if n in kvslim.CODEC_NAMES]
    out += ["| format | " + " | ".join(f"`{n}`" for n in codecs) + " |", "|---" * (len(codecs) + 1) + "|"]
    out += ["| bytes per 128-d vector | " + " | ".join(f"{kvslim.bytes_per_vector(n, 128):g}" for n in codecs) + " |"]
    return "\n".join(out) + "\n"


def update_file(path: Path) -> bool:
    """Replace the text between ``BEGIN`` and ``END`` in ``path`` by :func:`markdown_tables`; True if it changed."""
    from ..errors import InvalidInput

    text = path.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise InvalidInput(f"{path} needs one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    new = head + BEGIN + "\n" + markdown_tables() + END + rest.split(END)[1]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def register(app: typer.Typer) -> None:
    @app.command("recipes")
    @one_line_errors
    def recipes_cmd(
        check: str = typer.Option(None, "--check", help="Parse this recipe string and print it normalised (or the error)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        markdown: bool = typer.Option(False, "--markdown", help="Print the methods, presets and formats as Markdown."),
        update: Path = typer.Option(None, "--update", help="Write the Markdown tables between the lines "
                                    f"{BEGIN} and {END} of this file (README.md)."),
    ) -> None:
        """List methods (from the registry), named presets and codecs; combine as METHOD[:key=value,...][+CODEC]."""
        from rich.table import Table

        from ..cache.recipe import list_recipes, parse_recipe

        if update is not None:
            update_file(update)
            console.print(f"updated {update}", highlight=False, markup=False)
            return
        if markdown:
            typer.echo(markdown_tables(), nl=False)
            return
        if check is not None:
            r = parse_recipe(check)
            if as_json:
                print_json({"recipe": str(r), "kind": r.kind, "params": dict(r.params), "codec": r.codec,
                            "full_first": r.full_first})
            else:
                console.print(str(r), highlight=False, markup=False)
            return
        rows = list_recipes()
        if as_json:
            print_json({"recipes": rows})
            return
        table = Table(title="kvslim recipes: METHOD[:key=value,...][+CODEC], e.g. v4+tq3")
        for col in ("name", "description", "parameters (default - meaning)"):
            table.add_column(col, overflow="fold")
        for r in rows:
            params = "; ".join(f"{k}={v}" for k, v in r["parameters"].items())
            if not params and r["recipe"] != r["name"]:
                params = f"= {r['recipe']}"
            table.add_row(r["name"], r["description"], params)
        console.print(table)
