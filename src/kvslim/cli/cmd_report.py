"""``kvslim report``: table, heatmaps, frontier and Markdown summary of a ``kvslim niah`` results folder."""

from __future__ import annotations

import typer

from ._common import console, one_line_errors, print_json, warn_line


def _print_table(title: str, head: list[str], body: list[list[str]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(head):  # long recipe names fold over lines (an ellipsis made recall rows one "recal…")
        table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for row in body:
        table.add_row(*row)
    console.print(table)


def _print_markdown_table(title: str, md: str) -> None:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()]
    _print_table(title, rows[0], rows[2:])


def register(app: typer.Typer) -> None:
    @app.command("report")
    @one_line_errors
    def report_cmd(
        out: str = typer.Argument(..., help="A folder written by `kvslim niah --out` (one task, or a --suite)."),
        images: bool = typer.Option(True, "--images/--no-images", help="Write heatmap and frontier PNGs."),
        compare: tuple[str, str] | None = typer.Option(
            None, "--compare", help="Two different recipes, any spelling (e.g. --compare full stream, "
                                    "--compare full full-kivi2): a paired exact sign test (McNemar) on the prompts both "
                                    "ran, per task and pooled."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    ) -> None:
        """Print accuracy per recipe x length (95 % Wilson interval, cell count) with KV bytes and the ratio to a
        16-bit full cache; write heatmap-<recipe>.png (depth x length), frontier.png (accuracy vs KV bytes per
        token, with error bars) and summary.md. For a suite folder also the RULER table (score per task and length,
        and the average over tasks).

        Lines of results.jsonl that are not valid records are skipped and duplicate cells counted once (the first
        wins); each is named in a warning and in summary.md."""
        import dataclasses

        from ..eval.harness.suite import read_suite
        from ..eval.reports.report import build_report, summary_json, table_rows
        from ..eval.reports.suite_report import build_suite_report, suite_records, tables_markdown
        from ..eval.reports.suite_report import compare as compare_recipes

        suite = read_suite(out) is not None
        pairs = compare_recipes(suite_records(out), *compare) if compare else []  # refused before anything is written
        res = build_suite_report(out, images=images) if suite else build_report(out, images=images)
        for line in res["warnings"]:
            warn_line(line)
        if as_json:
            obj = {"summaries": [summary_json(s) for s in res["summaries"]], "files": res["files"],
                   "warnings": res["warnings"]}
            if suite:
                obj["suite"] = res["tables"]
            if pairs:
                obj["compare"] = [{"task": t, **dataclasses.asdict(p), "differ": p.differ} for t, p in pairs]
            print_json(obj)
            return
        for s in res["summaries"]:
            head, body = table_rows(s)
            _print_table(f"{s.task} on {s.model} ({s.metric}; depths {', '.join(f'{d:g}' for d in s.depths)})", head, body)
        if suite:
            for title, md in tables_markdown(res["tables"]):
                _print_markdown_table(title + " (mean string-match recall, 95 % Wilson, n cells)", md)
        for task, p in pairs:
            console.print(f"{task}: {p.sentence()}", highlight=False)
        console.print("wrote " + ", ".join(res["files"]), highlight=False)
