"""Sections written out: Markdown (plots linked from plots/) and one self-contained HTML file
(plots embedded, no scripts, nothing fetched)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from attnbench.presenting.layout import Section, Table
from attnbench.support.text import markdown_cell

PLOTS_FOLDER = "plots"
# A figure with its unit ("3.07 ms", "2.6e-07", "45%", "1.8×") is one unbreakable token in HTML.
_CLASSES = {"does not hold": ' class="does-not-hold"'}
_FIGURE = re.compile(r"\d[\d.,]*(?:e[-+]?\d+)?(?:\s?(?:ms|µs|ns|s|GiB|MiB|KiB|B|GFLOP/s|TFLOP/s|%|×))?")


def markdown(title: str, identity: str, sections: Sequence[Section]) -> str:
    out = [f"# {markdown_cell(title)}", "", markdown_cell(identity)]
    for section in sections:
        out += ["", f"## {section.title}"]
        for plot in section.plots:
            out += ["", f"![{plot.title}]({PLOTS_FOLDER}/{plot.stem}.png)", "", f"*{plot.caption}*"]
        for table in section.tables:
            out += ["", f"**{table.title}**", ""]
            if not table.rows:
                out.append("(none)")
            else:
                out.append("| " + " | ".join(table.headers) + " |")
                out.append("|" + "---|" * len(table.headers))
                out += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in table.rows]
            if table.note:
                out += ["", table.note]
    return "\n".join(out) + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } p.identity { color: #555; margin-top: 0; font-size: 0.9em; }
h2 { margin-top: 1.6em; } h3 { font-size: 1em; margin: 1em 0 0.3em; }
table { border-collapse: collapse; margin: 0.3em 0 1em; font-size: 0.82em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.n { white-space: nowrap; }
td.does-not-hold { color: #b00; font-weight: bold; }
section.answer table { font-size: 0.8em; } section.answer h3 { margin-top: 0.6em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { font-size: 0.85em; color: #555; }
"""


def html_page(title: str, identity: str, sections: Sequence[Section], plots_folder: Path) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>", f'<p class="identity">{e(identity)}</p>']
    for index, section in enumerate(sections):
        kind = ' class="answer"' if index == 0 else ""
        out.append(f"<section{kind}><h2>{e(section.title)}</h2>")
        for plot in section.plots:
            data = base64.b64encode((plots_folder / f"{plot.stem}.png").read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{e(plot.title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(plot.title)}. {e(plot.caption)}</figcaption></figure>")
        out += [_html_table(table) for table in section.tables]
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(table: Table) -> str:
    e = html.escape
    out = [f"<h3>{e(table.title)}</h3>"]
    if not table.rows:
        out.append("<p>(none)</p>")
    else:
        header = "".join(f"<th>{e(h)}</th>" for h in table.headers)
        out.append(f"<table><thead><tr>{header}</tr></thead><tbody>")
        for row in table.rows:
            cells = "".join(f"<td{_CLASSES.get(cell, '')}>{_cell(cell)}</td>" for cell in row)
            out.append(f"<tr>{cells}</tr>")
        out.append("</tbody></table>")
    if table.note:
        out.append(f'<p class="note">{e(table.note)}</p>')
    return "\n".join(out)


def _cell(text: str) -> str:
    """Escaped, each figure with its unit kept on one line."""
    out, end = [], 0
    for match in _FIGURE.finditer(text):
        out += [html.escape(text[end:match.start()]), f'<span class="n">{html.escape(match.group(0))}</span>']
        end = match.end()
    return "".join(out) + html.escape(text[end:])
