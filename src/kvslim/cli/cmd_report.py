"""``kvslim report``: table, heatmaps, frontier and Markdown summary of a ``kvslim niah`` results folder."""

from __future__ import annotations

import typer

from ._common import console, one_line_errors, print_json, warn_line


def register(app: typer.Typer) -> None:
    @app.command("report")
    @one_line_errors
    def report_cmd(
        out: str = typer.Argument(..., help="A folder written by `kvslim niah --out`."),
        images: bool = typer.Option(True, "--images/--no-images", help="Write heatmap and frontier PNGs."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    ) -> None:
        """Print accuracy per recipe x length with KV bytes and the ratio to a 16-bit full cache; write
        heatmap-<recipe>.png (depth x length), frontier.png (accuracy vs KV bytes per token) and summary.md.

        Lines of results.jsonl that are not valid records are skipped and duplicate cells counted once (the first
        wins); each is named in a warning and in summary.md."""
        from rich.table import Table

        from ..eval.report import build_report, summary_json, table_rows

        res = build_report(out, images=images)
        for line in res["warnings"]:
            warn_line(line)
        if as_json:
            print_json({"summaries": [summary_json(s) for s in res["summaries"]], "files": res["files"],
                        "warnings": res["warnings"]})
            return
        for s in res["summaries"]:
            head, body = table_rows(s)
            table = Table(title=f"{s.task} on {s.model} ({s.metric}; depths {', '.join(f'{d:g}' for d in s.depths)})")
            for i, h in enumerate(head):
                table.add_column(h, justify="left" if i == 0 else "right")
            for row in body:
                table.add_row(*row)
            console.print(table)
        console.print("wrote " + ", ".join(res["files"]), highlight=False)
