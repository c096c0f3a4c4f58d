"""``kvslim recipes``: every KV-cache recipe, preset and storage codec with a one-line description and parameters."""

from __future__ import annotations

import typer

from ._common import console, one_line_errors, print_json


def register(app: typer.Typer) -> None:
    @app.command("recipes")
    @one_line_errors
    def recipes_cmd(
        check: str = typer.Option(None, "--check", help="Parse this recipe string and print it normalised (or the error)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    ) -> None:
        """List methods (from the registry), named presets and codecs; combine as METHOD[:key=value,...][+CODEC]."""
        from rich.table import Table

        from ..cache.recipe import list_recipes, parse_recipe

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
