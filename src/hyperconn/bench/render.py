"""A benchmark report as text: markdown (:func:`render_markdown`) or rich tables (:func:`print_report`).

A report is a dict: ``kind``, ``meta`` (command, date, machine, settings), ``tables``
(each ``title``, ``columns``, ``rows``, optional ``notes``), optional ``notes``.
"""

from __future__ import annotations

import math
import sys

__all__ = ["MiB", "fmt", "fmt_mib", "render_markdown", "print_report"]

MiB = 2.0 ** 20


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def fmt_mib(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / MiB:.1f}"


def render_markdown(report: dict) -> str:
    """The report as markdown: header with machine/date/command, then every table."""
    meta = report["meta"]
    m = meta["machine"]
    lines = [f"# hyperconn bench {report['kind']}", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']}",
             f"- machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), python {m['python']}",
             f"- device: {m['device']}" + (f" ({m['device_name']}, CUDA {m['cuda']})" if m.get("device_name") else ""),
             f"- load average (1, 5, 15 min) at start / end: {m.get('load_avg_start')} / {m.get('load_avg_end')}",
             f"- peer: hyper-connections {m.get('hyper_connections') or 'not installed'}",
             f"- settings: {', '.join(f'{k}={v}' for k, v in meta['settings'].items())}", ""]
    for table in report["tables"]:
        lines += [f"## {table['title']}", ""]
        cols = table["columns"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for row in table["rows"]:
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
        for note in table.get("notes", []):
            lines.append(f"{note}  ")
        if table.get("notes"):
            lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def print_report(report: dict, console=None) -> None:
    """Rich tables on the terminal (plain text when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but keep the benchmark usable without it
        print(render_markdown(report))
        return
    # Off a terminal rich would wrap at 80 columns; logs are easier to read unwrapped.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    meta, m = report["meta"], report["meta"]["machine"]
    console.print(f"[bold]hyperconn bench {report['kind']}[/bold]  {meta['date']}")
    console.print(f"command: {meta['command']}")
    dev = m["device"] + (f" ({m['device_name']})" if m.get("device_name") else "")
    console.print(f"machine: {m['cpu']}, {m['cpu_cores']} cores, torch {m['torch']} "
                  f"({m['torch_threads']} threads), device {dev}, load {m.get('load_avg_start')} → {m.get('load_avg_end')}")
    for t in report["tables"]:
        table = Table(title=t["title"], title_justify="left")
        for i, c in enumerate(t["columns"]):
            table.add_column(c, justify="left" if i == 0 else "right")
        for row in t["rows"]:
            table.add_row(*(str(c) for c in row))
        console.print(table)
        for note in t.get("notes", []):
            console.print(f"  {note}", highlight=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)
