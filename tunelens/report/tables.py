"""The summary as a document of blocks, and how it is rendered: Markdown through pandas + tabulate,
HTML through a Jinja template (summary.html.j2). Also the number formats every table uses.

Section functions (tunelens.report.document) add headings, paragraphs, bullet lists and tables of
`Cell`s; a cell marked `best` is bold (for `value [low, high]` only the value, so the CI stays readable).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from tunelens.report.common import metric_info


@dataclass
class Cell:
    text: str
    best: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    align: list[str]  # 'l' or 'r' per column


@dataclass
class Document:
    """A summary as blocks, rendered to Markdown (summary.md) and HTML (summary.html, for the report)."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def to_markdown(self) -> str:
        out = []
        for kind, content in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1:]) + " " + content)
            elif kind == "p":
                out.append(content)
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in content))
            elif kind == "table":
                out.append(markdown_table(content))
        return "\n\n".join(out) + "\n"

    def to_html(self, title: str) -> str:
        blocks = [{"kind": kind, "level": int(kind[1:]) if kind.startswith("h") else None, "content": content}
                  for kind, content in self.blocks]
        return _html_template().render(title=title, css=_CSS, blocks=blocks)


# ============================================================================================ Markdown
def _markdown_cell(cell: Cell) -> str:
    text = cell.text.replace("|", "\\|")
    if cell.best and text:
        # Bold the point estimate only, so the CI stays readable: **12.3** [8.1, 16.0]
        head, sep, tail = text.partition(" [")
        text = f"**{head}**{sep}{tail}"
    return text


def markdown_table(table: Table) -> str:
    """A GitHub pipe table (tabulate); cells are text as given (no number parsing)."""
    frame = pd.DataFrame([[_markdown_cell(c) for c in row] for row in table.rows],
                         columns=[h.replace("|", "\\|") for h in table.header])
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                             colalign=["left" if a == "l" else "right" for a in table.align])


# ============================================================================================ HTML
_CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:100em}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}"
    "th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f0f0f0}"
    "td.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "td.best{background:#e6f4ea}code{background:#f4f4f4;padding:0 .2em}.ci{color:#666;font-size:.85em}"
    "h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd}h3{font-size:1.1em}"
)


def inline_html(text: str):
    """Markdown inline marks of the summary (`code`, **bold**) as HTML; everything else escaped."""
    from markupsafe import Markup

    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return Markup(re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text))


def html_cell(cell: Cell, align: str):
    """A <td>: right-aligned numbers, the best value in bold, a CI in small grey type."""
    from markupsafe import Markup

    classes = " ".join(x for x in (align if align == "r" else "", "best" if cell.best else "") if x)
    text = str(inline_html(cell.text))
    head, sep, tail = text.partition(" [")
    if sep and re.fullmatch(r"[-0-9.]+, [-0-9.]+\]( \*)?", tail):
        # value [low, high]: the CI in small grey type so the columns stay narrow
        star = " *" if tail.endswith(" *") else ""
        tail = tail[: -len(star)] if star else tail
        head = f"<strong>{head}</strong>" if cell.best else head
        text = f"{head} <span class=\"ci\">[{tail}</span>{star}"
    elif cell.best and text:
        text = f"<strong>{text}</strong>"
    return Markup(f"<td class=\"{classes}\">{text}</td>" if classes else f"<td>{text}</td>")


@lru_cache(maxsize=1)
def _html_template():
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                                     keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    environment.filters["inline"] = inline_html
    environment.filters["cell"] = html_cell
    return environment.get_template("summary.html.j2")


# ============================================================================================ numbers
def format_number(value: float, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    text = f"{value:.{decimals}f}"
    return "0." + "0" * decimals if text == "-0." + "0" * decimals else text  # no "-0.000"


def format_estimate(value: float, low: float, high: float, decimals: int, signed: bool = False) -> str:
    """'12.3 [8.1, 16.0]'; the CI is left out when the file has none; '–' when there is no value."""
    if value is None or not math.isfinite(value):
        return "–"
    point = format_number(value, decimals)
    if signed and not point.startswith("-") and float(point) != 0:
        point = "+" + point
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return point
    return f"{point} [{format_number(low, decimals)}, {format_number(high, decimals)}]"


def significance(p_adjusted: float, alpha: float) -> str:
    """' *' when a comparison's (adjusted) p-value is below alpha."""
    return " *" if p_adjusted is not None and math.isfinite(p_adjusted) and p_adjusted < alpha else ""


def format_p(value: float) -> str:
    """A p-value with 3 decimals ('–' when there is none)."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3f}"


def estimate_cell(entry: dict | pd.Series | None, metric: str) -> Cell:
    if entry is None:
        return Cell("–")
    return Cell(format_estimate(entry["value"], entry["ci_low"], entry["ci_high"], metric_info(metric).decimals))


def mark_best(rows: list[list[Cell]], values: list[list[float]], metrics: Sequence[str | None]) -> None:
    """Mark the best value of each column (ties all marked); columns of metrics without direction are not."""
    for column, metric in enumerate(metrics):
        if metric is None:
            continue
        direction = metric_info(metric).higher_is_better
        column_values = [row[column] for row in values]
        finite = [v for v in column_values if v is not None and math.isfinite(v)]
        if direction is None or len(finite) < 2 or len(set(finite)) == 1:
            continue  # nothing to single out when every value is the same
        best = max(finite) if direction else min(finite)
        decimals = metric_info(metric).decimals
        for row, value in zip(rows, column_values):
            # Compare as shown, so two cells that read the same are both marked.
            if value is not None and math.isfinite(value) and format_number(value, decimals) == format_number(best, decimals):
                row[column].best = True
