"""Reports of a stored run, rebuilt from its rows: ``table.csv``, ``report.md``, a self-contained
``report.html`` (images embedded, no scripts, nothing fetched) and ``plots/`` (PNG and SVG)."""

from __future__ import annotations

import base64
import html
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from attnbench.analysis.curves import (
    Crossover,
    Declared,
    ParetoPoint,
    ScalingFit,
    Throughput,
    can_be_baseline,
    crossovers,
    curves,
    metric_value,
    pareto,
    scaling_fits,
    throughputs,
)
from attnbench.contract.case import CURVE_LABEL, curve_x, describe_group, group_key
from attnbench.measuring.figures import NOISY_RELATIVE_IQR
from attnbench.presenting.columns import report_cells
from attnbench.presenting.plots import Palette, Plot, exponent_plot, pareto_plot, scaling_plot, speedup_plot
from attnbench.presenting.table import tidy_frame
from attnbench.storage.results import Row
from attnbench.storage.run_folder import RunFolder
from attnbench.support.text import markdown_cell
from attnbench.support.units import format_seconds

CSV_FILE = "table.csv"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
PLOTS_FOLDER = "plots"


@dataclass(frozen=True)
class Table:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    tables: tuple[Table, ...]
    plots: tuple[Plot, ...] = ()


def write_reports(run: RunFolder) -> list[Path]:
    """Every report file of the run, overwritten; returns their paths."""
    folder = run.path
    tidy_frame(run.rows).to_csv(folder / CSV_FILE, index=False)
    sections = build_sections(run, folder / PLOTS_FOLDER)
    heading, facts = _heading(run)
    (folder / MARKDOWN_FILE).write_text(_markdown(heading, facts, sections), encoding="utf-8")
    (folder / HTML_FILE).write_text(_html(heading, facts, sections, folder / PLOTS_FOLDER), encoding="utf-8")
    return [folder / CSV_FILE, folder / MARKDOWN_FILE, folder / HTML_FILE, folder / PLOTS_FOLDER]


def build_sections(run: RunFolder, plots_folder: Path) -> list[Section]:
    rows, declared = run.rows, run.declared
    fits = scaling_fits(rows, declared)
    achieved = throughputs(rows, declared, run.matmul_flops)
    sections = [
        Section("Flagged points", (_flag_table(rows),)),
        Section("Scaling verdicts", (_verdict_table(fits),)),
        Section("Crossovers against the best exact implementation", (_crossover_table(crossovers(rows, declared)),)),
        Section("Throughput of exact implementations", (_throughput_table(achieved, run.matmul_flops),)),
    ]
    palette = Palette([row.implementation for row in rows])
    by_curve = curves(rows)
    front = pareto(rows)
    for group in dict.fromkeys(group for _, group in by_curve):
        group_curves = {name: points for (name, g), points in by_curve.items() if g == group}
        plots = [scaling_plot(group_curves, metric, group, palette, plots_folder) for metric in ("latency", "memory")]
        baseline = _baseline(group_curves, declared)
        if baseline is not None:
            plots.append(speedup_plot(group_curves, baseline, group, palette, plots_folder))
        group_points = [point for point in front if group_key(point.row.case) == group]
        optional = [pareto_plot(group_points, group, palette, plots_folder),
                    exponent_plot([fit for fit in fits if fit.group == group], group, plots_folder)]
        plots.extend(plot for plot in optional if plot is not None)
        tables = (_results_table(group_curves), _pareto_table(group_points))
        sections.append(Section(describe_group(group), tables, tuple(plots)))
    return sections


def _baseline(group_curves: Mapping[str, list[Row]], declared: Mapping[str, Declared]) -> str | None:
    """The exact implementation measured at the most seq_lens (then the fastest overall), counting
    only points correct at the default tolerance."""
    candidates = []
    for name, points in group_curves.items():
        if name in declared and declared[name].exact:
            times = [value for row in points if can_be_baseline(row) and (value := metric_value(row, "latency"))]
            if times:
                candidates.append((-len(times), sum(times), name))
    return min(candidates)[2] if candidates else None


def _flag_table(rows: Sequence[Row]) -> Table:
    lines = tuple(
        (row.implementation, describe_group(group_key(row.case)), str(curve_x(row.case)), flag.kind, flag.message)
        for row in sorted(rows, key=lambda r: (r.implementation, describe_group(group_key(r.case)), curve_x(r.case)))
        for flag in row.flags
    )
    note = ("What the harness found beside the figures. implausible_speed and fresh_inputs_slower: the latency is "
            "not a result and is left out of every comparison; loose_tolerance: correct only at a tolerance looser "
            "than the dtype's default, never a baseline; under_load: other processes kept CPUs busy while it was "
            "timed; throttled: the GPU slowed itself down (power cap, heat) while it was timed; "
            "memory_outside_torch: the process peak far above torch's count (verdicts use the larger).")
    return Table("Flags", ("implementation", "case", CURVE_LABEL, "flag", "what"), lines, note)


def _verdict_table(fits: Sequence[ScalingFit]) -> Table:
    lines = tuple(
        (fit.implementation, describe_group(fit.group), fit.metric, fit.declared or "unknown", fit.measured,
         fit.verdict)
        for fit in sorted(fits, key=lambda f: (describe_group(f.group), f.implementation, f.metric))
    )
    note = ("Least-squares fit (scipy.stats.linregress) of log(median latency) and log(peak memory) on log(N) over "
            "each curve's largest measured points (up to 4; at least 3 for a verdict); ± is one standard error, of "
            "the regression combined with a bootstrap over each point's latency samples. A declaration holds unless "
            "the measured exponent exceeds it by more than 0.2 plus the 95% confidence half-width (Student's t).")
    return Table("Declared vs measured complexity", ("implementation", "case", "metric", "declared", "measured",
                                                      "verdict"), lines, note)


def _crossover_table(results: Sequence[Crossover]) -> Table:
    lines = tuple(
        (c.implementation, describe_group(c.group), "latency" if c.metric == "latency" else "peak memory", c.text)
        for c in sorted(results, key=lambda c: (describe_group(c.group), c.implementation, c.metric))
    )
    note = ("At each N the best exact implementation is the fastest (or leanest) exact one measured there; the "
            "crossover is interpolated on the log-log curves.")
    return Table(f"From which {CURVE_LABEL} each approximation wins", ("implementation", "case", "metric", "crossover"),
                 lines, note)


def _throughput_table(results: Sequence[Throughput], matmul: Mapping[str, float]) -> Table:
    lines = tuple(
        (t.row.implementation, describe_group(group_key(t.row.case)), str(curve_x(t.row.case)),
         f"{t.achieved_flops / 1e9:.1f}", f"{100 * t.fraction_of_matmul:.0f}%" if t.fraction_of_matmul else "n/a")
        for t in results
    )
    yardstick = ", ".join(f"{key}: {value / 1e9:.1f} GFLOP/s" for key, value in matmul.items()) or "not measured"
    note = ("FLOPs = 4·B·H·N²·D forward, halved when causal, ×3.5 with the backward (2.5× forward), as "
            f"FlashAttention's benchmarks count. Matmul throughput measured in this run: {yardstick}.")
    return Table("Achieved throughput", ("implementation", "case", CURVE_LABEL, "GFLOP/s", "of matmul"), lines, note)


def _results_table(group_curves: Mapping[str, list[Row]]) -> Table:
    lines = []
    figure_headers: tuple[str, ...] = ()
    for name, points in sorted(group_curves.items()):
        for row in points:
            cells = report_cells(row)
            figure_headers = tuple(cells)
            lines.append((
                name, str(curve_x(row.case)), row.status, *cells.values(),
                "; ".join((*(flag.message for flag in row.flags), *row.reasons, *row.notes))[:300],
            ))
    headers = ("implementation", CURVE_LABEL, "status", *figure_headers, "reasons, notes")
    return Table("Every point", headers, tuple(lines))


def _pareto_table(points: Sequence[ParetoPoint]) -> Table:
    by_seq_len: dict[int, list[ParetoPoint]] = defaultdict(list)
    for point in points:
        if point.on_front:
            by_seq_len[curve_x(point.row.case)].append(point)
    lines = tuple(
        (str(seq_len), ", ".join(
            f"{p.row.implementation} ({format_seconds(p.row.latency.median_s)}, {p.error:.1e})"
            for p in sorted(front, key=lambda p: p.row.latency.median_s)
        ))
        for seq_len, front in sorted(by_seq_len.items())
    )
    return Table("Pareto front (fastest first: latency, relative error)", (CURVE_LABEL, "front"), lines)


def _heading(run: RunFolder) -> tuple[str, list[tuple[str, str]]]:
    env = run.environment
    packages = env.get("packages", {})
    facts = [
        ("run", run.run_id),
        ("started", env.get("started_at", "unknown")),
        ("commit", f"{env.get('git_commit') or 'unknown'}{' (uncommitted changes)' if env.get('git_dirty') else ''}"),
        ("CPU", f"{env.get('cpu_model', 'unknown')}, {env.get('cpus_usable', '?')} usable cores, "
                f"torch threads {env.get('torch_threads', '?')}"),
        ("devices", ", ".join(f"{k}: {v}" for k, v in env.get("devices", {}).items()) or "CPU only"),
        ("packages", ", ".join(f"{k} {v}" for k, v in packages.items())),
        ("timing settings", ", ".join(f"{k}={v}" for k, v in env.get("timing_variables", {}).items()) or "none set"),
        ("load at start", _load_text(env)),
        ("worker allocator", env.get("worker_allocator") or "not recorded"),
        ("latency rounds", _rounds_text(run.rows)),
        ("rows", f"{len(run.rows)} ({', '.join(f'{s} {n}' for s, n in Counter(r.status for r in run.rows).items())})"),
        ("flagged", ", ".join(f"{kind} {n}" for kind, n in Counter(f.kind for r in run.rows for f in r.flags).items())
         or "none"),
        ("load while timed", _timed_load_text(run.rows)),
        ("matmul and copy yardsticks", _yardstick_text(env)),
        ("correctness checks", "query rows (and key rows for dk, dv) drawn per point after its first call; the "
                               "first call, the last timed call of every round and a call on fresh inputs compared "
                               "with float64 references of the inputs as made; inputs compared after every call"),
        ("plugins", ", ".join(f"{name}: {info.get('distribution')} {info.get('version')}"
                              for name, info in env.get("plugins", {}).items()) or "not recorded"),
    ]
    return f"attnbench report — {run.suite_name} — {run.run_id}", facts


def _rounds_text(rows: Sequence[Row]) -> str:
    """How the timed points were measured: rounds per point, and how many had rounds that disagree."""
    timed = [row.latency for row in rows if row.latency is not None]
    if not timed:
        return "no latency measured"
    counts = sorted({len(latency.round_sizes) for latency in timed})
    spread = sum(latency.round_spread > NOISY_RELATIVE_IQR for latency in timed)
    return (f"{'/'.join(map(str, counts))} per point, implementations taking turns; headline = fastest round's "
            f"median; {spread} of {len(timed)} points with rounds more than {NOISY_RELATIVE_IQR:.0%} apart")


def _timed_load_text(rows: Sequence[Row]) -> str:
    loads = [row.latency.load for row in rows if row.latency is not None and row.latency.load is not None]
    if not loads:
        return "not recorded"
    return (f"other processes kept {statistics.median(loads):.2f} CPUs busy (median over points), at most "
            f"{max(loads):.2f}")


def _yardstick_text(env: Mapping[str, object]) -> str:
    samples = env.get("matmul_flops_samples") or {}
    best = env.get("matmul_flops") or {}
    copy = env.get("copy_bytes_per_s") or {}
    if not best:
        return "not measured"
    return ", ".join(f"{key}: best {value / 1e9:.1f} GFLOP/s"
                     + (f", copy {copy[key] / 1e9:.1f} GB/s" if key in copy else "")
                     + f" of {len(samples.get(key, [])) or 1} measurement(s)" for key, value in best.items())


def _load_text(env: Mapping[str, object]) -> str:
    load = env.get("load_average")
    text = f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)" if load else "not recorded"
    frequency = env.get("cpu_frequency")
    return f"{text}; CPU {frequency}" if frequency else text


def _markdown(heading: str, facts: list[tuple[str, str]], sections: Sequence[Section]) -> str:
    out = [f"# {markdown_cell(heading)}", ""]
    out += [f"- **{key}**: {markdown_cell(value)}" for key, value in facts]
    for section in sections:
        out += ["", f"## {section.title}"]
        for plot in section.plots:
            out += ["", f"![{plot.title}]({PLOTS_FOLDER}/{plot.stem}.png)", "", f"*{plot.caption}*"]
        for table in section.tables:
            out += ["", f"**{table.title}**", ""]
            if not table.rows:
                out.append("(none)")
                continue
            out.append("| " + " | ".join(table.headers) + " |")
            out.append("|" + "---|" * len(table.headers))
            out += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in table.rows]
            if table.note:
                out += ["", table.note]
    return "\n".join(out) + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.does-not-hold { color: #b00; font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { font-size: 0.85em; color: #555; }
"""


def _html(heading: str, facts: list[tuple[str, str]], sections: Sequence[Section], plots_folder: Path) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(heading)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(heading)}</h1>", "<ul>"]
    out += [f"<li><b>{e(key)}</b>: {e(value)}</li>" for key, value in facts]
    out.append("</ul>")
    for section in sections:
        out.append(f"<section><h2>{e(section.title)}</h2>")
        for plot in section.plots:
            data = base64.b64encode((plots_folder / f"{plot.stem}.png").read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{e(plot.title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(plot.title)}. {e(plot.caption)}</figcaption></figure>")
        for table in section.tables:
            out.append(f"<h3>{e(table.title)}</h3>")
            if not table.rows:
                out.append("<p>(none)</p>")
                continue
            header = "".join(f"<th>{e(h)}</th>" for h in table.headers)
            out.append(f"<table><thead><tr>{header}</tr></thead><tbody>")
            for row in table.rows:
                cells = "".join(
                    f'<td class="does-not-hold">{e(cell)}</td>' if cell == "does not hold" else f"<td>{e(cell)}</td>"
                    for cell in row
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
            if table.note:
                out.append(f'<p class="note">{e(table.note)}</p>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
