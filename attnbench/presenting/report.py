"""Reports of a stored run, rebuilt from its rows: ``table.csv``, ``report.md``, a self-contained
``report.html`` and ``plots/`` (PNG and SVG).

A report opens with the answer (attnbench.presenting.answer); the plots and the detailed tables
follow, then how the run was measured.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from attnbench.analysis.curves import (
    Crossover,
    Declared,
    ParetoPoint,
    Throughput,
    can_be_baseline,
    crossovers,
    curves,
    is_exact,
    memory_name,
    metric_value,
    pareto,
    throughputs,
    within_budget,
)
from attnbench.analysis.decode import decode_points
from attnbench.analysis.scaling import SLOWDOWN_BOUND, USEFUL_EXCESS, ScalingFit, scaling_fits
from attnbench.analysis.sources import SourceErrors, errors_by_source
from attnbench.contract.case import CURVE_LABEL, curve_x, describe_group, group_key
from attnbench.measuring.figures import ErrorFigures
from attnbench.presenting.answer import answer_tables, budget_note
from attnbench.presenting.columns import point_note, report_cells, speed_order
from attnbench.presenting.decode import decode_tables
from attnbench.presenting.figure_style import Palette
from attnbench.presenting.layout import Section, Table
from attnbench.presenting.plots import exponent_plot, pareto_plot, scaling_plot, speedup_plot
from attnbench.presenting.render import PLOTS_FOLDER, html_page, markdown
from attnbench.presenting.run_facts import identity_line, run_facts
from attnbench.presenting.table import tidy_frame
from attnbench.settings.loader import load_report_settings
from attnbench.storage.ledger import REMOVED, Finding
from attnbench.storage.results import Row
from attnbench.storage.run_folder import SUITE_COPY, RunFolder
from attnbench.support.units import format_seconds

CSV_FILE = "table.csv"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"


def write_reports(run: RunFolder, budgets: Sequence[float] | None = None) -> list[Path]:
    """Every report file of the run, overwritten; returns their paths. ``budgets``: the error
    budgets (relative Frobenius error); None: the run's suite's, else the defaults."""
    folder = run.path
    if budgets is None:
        budgets = load_report_settings(folder / SUITE_COPY).error_budgets
    tidy_frame(run.rows).to_csv(folder / CSV_FILE, index=False)
    sections = build_sections(run, folder / PLOTS_FOLDER, budgets)
    title, facts = run_facts(run)
    sections.append(Section("How this was measured", (Table("Run details", ("what", "value"), tuple(facts)),
                                                      *_ledger_table(run))))
    identity = identity_line(run)
    (folder / MARKDOWN_FILE).write_text(markdown(title, identity, sections), encoding="utf-8")
    (folder / HTML_FILE).write_text(html_page(title, identity, sections, folder / PLOTS_FOLDER), encoding="utf-8")
    return [folder / CSV_FILE, folder / MARKDOWN_FILE, folder / HTML_FILE, folder / PLOTS_FOLDER]


def build_sections(run: RunFolder, plots_folder: Path, budgets: Sequence[float]) -> list[Section]:
    rows, declared = run.rows, run.declared
    fits = scaling_fits(rows, declared)
    answer = answer_tables(rows, declared, budgets)
    if answer:
        answer[-1] = Table(answer[-1].title, answer[-1].headers, answer[-1].rows, budget_note(budgets))
    sections = [Section(f"Answer: which implementation at each {CURVE_LABEL}", tuple(answer))]
    by_source = errors_by_source(rows, declared)
    if by_source:
        sections.append(Section("Error by input source", tuple(_source_table(errors) for errors in by_source)))
    palette = Palette([row.implementation for row in rows])
    by_curve = curves(rows)
    front, memory_front = pareto(rows), pareto(rows, "memory")
    loosest = max(budgets)
    for group in dict.fromkeys(group for _, group in by_curve):
        group_curves = {name: points for (name, g), points in by_curve.items() if g == group}
        plots = [scaling_plot(group_curves, metric, group, palette, plots_folder) for metric in ("latency", "memory")]
        baseline = _baseline(group_curves, declared)
        if baseline is not None:
            plots.append(speedup_plot(group_curves, baseline, group, palette, plots_folder, loosest, declared))
        group_points = [point for point in front if group_key(point.row.case) == group]
        memory_points = [point for point in memory_front if group_key(point.row.case) == group]
        optional = [pareto_plot(group_points, group, palette, plots_folder, budgets),
                    pareto_plot(memory_points, group, palette, plots_folder, budgets, metric="memory"),
                    exponent_plot([fit for fit in fits if fit.group == group], group, plots_folder)]
        plots.extend(plot for plot in optional if plot is not None)
        tables = (_results_table(group_curves), _pareto_table(group_points, loosest))
        sections.append(Section(describe_group(group), tables, tuple(plots)))
    steps = decode_points(rows, run.copy_bytes_per_s)
    if steps:
        sections.append(Section("Decode steps", tuple(decode_tables(steps, run.copy_bytes_per_s))))
    sections += [
        Section("Crossovers against the best exact implementation", (_crossover_table(rows, declared, budgets),)),
        Section("Throughput", (_throughput_table(throughputs(rows, declared, run.matmul_flops), run.matmul_flops),)),
        Section("Scaling verdicts", (_verdict_table(fits),)),
        Section("Flagged points", (_flag_table(rows),)),
    ]
    return sections


def _ledger_table(run: RunFolder) -> tuple[Table, ...]:
    """The rows of the run's ledger changed, added or removed after the run (none: no table)."""
    check = run.ledger
    if not check.edited:
        return ()
    lines = (*(("ledger", "", problem) for problem in check.problems),
             *((finding.kind, _ledger_line(finding), finding.point) for finding in check.findings))
    note = ("Lines of rows.jsonl whose seal does not verify: the harness did not write them as they are. Changed "
            "and added rows are left out of every table, plot and answer above; removed rows are no longer in the "
            "file.")
    return (Table("Rows edited after the run (not reported)", ("what", "line", "point"), lines, note),)


def _ledger_line(finding: Finding) -> str:
    if finding.kind != REMOVED:
        return str(finding.line)
    return f"after {finding.line}{' (the last)' if finding.at_end else ''}" if finding.line else "at the start"


def _baseline(group_curves: Mapping[str, list[Row]], declared: Mapping[str, Declared]) -> str | None:
    """The exact implementation measured at the most seq_lens (then the fastest overall), counting
    only points correct at the default tolerance."""
    candidates = []
    for name, points in group_curves.items():
        if is_exact(name, declared):
            times = [value for row in points if can_be_baseline(row) and (value := metric_value(row, "latency"))]
            if times:
                candidates.append((-len(times), sum(times), name))
    return min(candidates)[2] if candidates else None


def _flag_table(rows: Sequence[Row]) -> Table:
    lines = tuple(
        (flag.kind, row.implementation, describe_group(group_key(row.case)), str(curve_x(row.case)), flag.message)
        for row in rows for flag in row.flags
    )
    note = ("What the harness found beside the figures. implausible_speed, fresh_inputs_slower, timing_disagrees "
            "(the worker stated less time than the harness's own clock saw pass) and cpu_over_threads (more CPU time "
            "than its threads allow): the latency is not a result and is left out of every comparison; implausible_work: the FLOPs an approximation declared "
            "would put it beyond the device's matmul rate, so no throughput is shown; loose_tolerance: correct only "
            "at a tolerance looser than the dtype's default, never a baseline; under_load: other processes kept CPUs "
            "busy while it was timed; throttled: the GPU slowed itself down (power cap, heat) while it was timed; "
            "memory_outside_torch: the process peak far above torch's count (verdicts use the larger); "
            "state_outside_torch: a decode step's processes keep far more between steps than torch counted "
            "(its state is what they keep).")
    return Table("Flags, by kind", ("flag", "implementation", "case", CURVE_LABEL, "what"), tuple(sorted(lines)), note)


_VERDICT_ORDER = {"does not hold": 0, "holds": 1, "undetermined": 2}


def _verdict_table(fits: Sequence[ScalingFit]) -> Table:
    ordered = sorted(fits, key=lambda f: (_VERDICT_ORDER[f.verdict], f.metric, -(f.exponent or 0.0),
                                          describe_group(f.group), f.implementation))
    lines = tuple(
        (fit.implementation, describe_group(fit.group), fit.metric, fit.declared or "unknown", fit.measured,
         "" if fit.detectable is None else f"{fit.detectable:.2f}", fit.verdict + (f": {fit.why}" if fit.why else ""))
        for fit in ordered
    )
    note = (f"Failed declarations first, then steepest first. The exponent is the least-squares slope of "
            f"log(fastest round's median latency) or log(peak memory; for a decode step, the state it keeps) on "
            f"log(N) over each curve's measured N. Its 95% interval (Student's t) comes from the spread of the rounds "
            f"(each its own worker process), or, with one round a point, from the fit's residuals. A "
            f"declaration is refuted only by growth no per-operation cost explains: one that changes up to "
            f"{SLOWDOWN_BOUND:g}× across the range (caches, a window not yet filled) is allowed. 'Detects': the "
            f"smallest excess over the declared exponent the fit would call 'does not hold' (that allowance plus "
            f"the interval's lower half). A declaration 'holds' only where that is at most {USEFUL_EXCESS:g}, "
            f"half a power of N, the gap between n, n^1.5 and n²; elsewhere it is undetermined, with the reason.")
    return Table("Declared vs measured complexity", ("implementation", "case", "metric", "declared", "measured",
                                                      "detects", "verdict"), lines, note)


def _crossover_table(rows: Sequence[Row], declared: Mapping[str, Declared], budgets: Sequence[float]) -> Table:
    per_budget = {budget: crossovers(rows, declared, budget) for budget in budgets}
    loosest = per_budget[max(budgets)]
    lines = []
    for index, c in sorted(enumerate(loosest), key=lambda item: _crossover_order(item[1])):
        metric = "latency" if c.metric == "latency" else memory_name(c.group)
        lines.append((c.implementation, describe_group(c.group), metric,
                      *(per_budget[budget][index].text for budget in budgets)))
    note = ("At each N the best exact implementation is the fastest (or leanest) exact one measured there; the "
            "crossover is interpolated on the log-log curves, counting only the approximation's points whose error is "
            "within the budget. Earliest crossover (at the loosest budget) first.")
    headers = ("implementation", "case", "metric", *(f"error ≤ {budget:g}" for budget in budgets))
    return Table(f"From which {CURVE_LABEL} each approximation wins", headers, tuple(lines), note)


def _crossover_order(crossover: Crossover) -> tuple[int, float, str, str]:
    known = crossover.seq_len is not None
    return (not known, crossover.seq_len if known else 0.0, crossover.metric, crossover.implementation)


def _throughput_table(results: Sequence[Throughput], matmul: Mapping[str, float]) -> Table:
    ordered = sorted(results, key=lambda t: (describe_group(group_key(t.row.case)), curve_x(t.row.case),
                                             -t.achieved_flops))
    lines = tuple(
        (t.row.implementation, describe_group(group_key(t.row.case)), str(curve_x(t.row.case)),
         f"{t.achieved_flops / 1e9:.1f}",
         f"{100 * t.fraction_of_matmul:.0f}% of {t.matmul_dtype}" if t.fraction_of_matmul else "n/a",
         format_seconds(t.row.latency.median_s), f"{t.flops:.3g}", t.formula)
        for t in ordered
    )
    yardstick = ", ".join(f"{key}: {value / 1e9:.1f} GFLOP/s" for key, value in matmul.items()) or "not measured"
    note = ("Highest first at each N. FLOPs of one timed call: the matrix products at leading order, 2 per "
            "multiply-add (elementwise work and a kernel's padding not counted). Exact attention is counted by the "
            "harness, 4·B·H·N²·D (halved when causal), as FlashAttention's benchmarks count; an approximation by the "
            "formula it declares; a training step counts 3.5× the forward. An implementation that declares no count "
            f"has no row here. Of matmul: against the device's matmul in the row's dtype or in float32, whichever is "
            "faster (an implementation may compute half precision in float32, the arithmetic that then runs), "
            f"named in the cell. Matmul throughput measured in this run: {yardstick}.")
    headers = ("implementation", "case", CURVE_LABEL, "GFLOP/s", "of matmul", "median", "FLOPs", "counted as")
    return Table("Achieved throughput", headers, lines, note)


def _results_table(group_curves: Mapping[str, list[Row]]) -> Table:
    points = sorted((row for rows in group_curves.values() for row in rows), key=speed_order)
    figure_headers = tuple(report_cells(points[0])) if points else ()
    lines = tuple((row.implementation, str(curve_x(row.case)), row.status, *report_cells(row).values(),
                   point_note(row)[:400]) for row in points)
    headers = ("implementation", CURVE_LABEL, "status", *figure_headers, "notes, reasons")
    return Table(f"Every point ({CURVE_LABEL}, then fastest first)", headers, lines)


def _source_table(errors: SourceErrors) -> Table:
    """Per approximation and N, its error on each input source (the same settings otherwise)."""
    lines = tuple(
        (name, str(seq_len), *(_error_cell(per_source.get(source)) for source in errors.sources))
        for (name, seq_len), per_source in errors.errors.items()
    )
    note = ("Relative Frobenius error of the output against float64 exact attention, and the mean cosine "
            "similarity of its rows with the exact output; the same implementation, options and shape on each "
            "input source (see \"How this was measured\" for what each source is).")
    return Table(f"Error by input source — {describe_group(errors.group)}", ("implementation", CURVE_LABEL,
                                                                             *errors.sources), lines, note)


def _error_cell(figures: ErrorFigures | None) -> str:
    if figures is None:
        return ""
    cosine = f" · cos {figures.cosine_mean:.3f}" if figures.cosine_mean is not None else ""
    return f"{figures.rel_fro:.2g}{cosine}"


def _pareto_table(points: Sequence[ParetoPoint], budget: float) -> Table:
    by_seq_len: dict[int, list[ParetoPoint]] = defaultdict(list)
    for point in points:
        if point.on_front:
            by_seq_len[curve_x(point.row.case)].append(point)
    lines = tuple(
        (str(seq_len), ", ".join(
            f"{p.row.implementation} ({format_seconds(p.row.latency.median_s)}, {p.error:.1e}"
            f"{'' if within_budget(p.row, budget) else f', over {budget:g}'})"
            for p in sorted(front, key=lambda p: p.row.latency.median_s)
        ))
        for seq_len, front in sorted(by_seq_len.items())
    )
    return Table("Pareto front (fastest first: latency, relative error)", (CURVE_LABEL, "front"), lines,
                 f"A point marked 'over {budget:g}' is on the front only by trading accuracy away beyond the loosest "
                 "error budget.")
