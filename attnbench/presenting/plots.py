"""The run's figures (matplotlib), per group of fixed axes: latency (with its spread) and memory
against seq_len, log-log, with n and n² guides; error against latency (the Pareto front); speed-up
over the baseline; and the measured scaling exponents beside the declared ones.

Points that did not run are crosses in a strip below every measured point, labelled with their
status, so a gap in a curve is never silent. Approximations over the error budget are grey.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from attnbench.analysis.curves import (
    Declared,
    Metric,
    ParetoPoint,
    can_be_baseline,
    is_exact,
    memory_name,
    metric_value,
    result_latency,
    within_budget,
)
from attnbench.analysis.history import History
from attnbench.analysis.scaling import ScalingFit
from attnbench.contract.case import AXES, CURVE_AXIS, CURVE_LABEL, Case, curve_x, describe_group
from attnbench.presenting.figure_style import (
    BYTES,
    COLOURS,
    GUIDE_COLOUR,
    OVER_BUDGET_COLOUR,
    SECONDS,
    TIMES,
    Palette,
    implementation_of,
    log_axes,
    new_figure,
    save,
    widen_to,
)
from attnbench.presenting.layout import Plot
from attnbench.settings.variants import split_series
from attnbench.storage.results import Row

GAP_LANE = 0.05  # height of one "not run" lane, as a fraction of the axes
# Errors at or below this are rounding, not approximation (exact implementations sit near 1e-7 in
# float32): the frontier plots draw them on their bottom edge.
ROUNDING_ERROR = 1e-4


def group_slug(group: Case) -> str:
    text = describe_group(group)
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def scaling_plot(
    curves: dict[str, list[Row]], metric: Metric, group: Case, palette: Palette, folder: Path
) -> Plot:
    figure, axes = new_figure(8, 5.2)
    measured: list[tuple[int, float]] = []
    for name, points in sorted(curves.items()):
        ran = [row for row in points if metric_value(row, metric) is not None]
        if not ran:
            continue
        xs = [curve_x(row.case) for row in ran]
        ys = [metric_value(row, metric) for row in ran]
        if metric == "latency":
            bands = [row.latency.band_s for row in ran]
            spread = [[y - low for y, (low, _) in zip(ys, bands, strict=True)],
                      [high - y for y, (_, high) in zip(ys, bands, strict=True)]]
            axes.errorbar(xs, ys, yerr=spread, marker="o", markersize=4, capsize=3, color=palette(name), label=name)
        else:
            axes.plot(xs, ys, marker="o", markersize=4, color=palette(name), label=name)
        measured.extend(zip(xs, ys, strict=True))
    if measured:
        _guides(axes, measured)
    lanes = _mark_gaps(axes, curves, palette, lambda row: metric_value(row, metric) is None)
    formatter = SECONDS if metric == "latency" else BYTES
    widen_to(axes, 4.0)
    _reserve_gap_strip(axes, lanes)
    log_axes(axes, y_formatter=formatter, x_values=[n for n, _ in measured])
    what = "median latency" if metric == "latency" else memory_name(group)
    axes.set_ylabel(f"{what} (log scale)")
    axes.set_xlabel(_curve_axis_label())
    axes.set_title(f"{what} vs {CURVE_LABEL} — {describe_group(group)}", fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    stem = f"{group_slug(group)}-{metric}"
    save(figure, folder, stem)
    spread = ("Bars: from the fastest round's first quartile to its third quartile or the slowest round's median. "
              if metric == "latency" else "What a step keeps between steps (its cache or state), as torch's allocator "
              "counts it. " if group.decode else "The larger of torch's allocator peak and the process peak. ")
    caption = (f"{spread}Grey dashed guides grow as n and n² from the lowest measured point at the smallest "
               f"{CURVE_LABEL}; crosses in the strip below the curves are points that did not run, with their status.")
    return Plot(f"{what.capitalize()} vs sequence length", stem, caption)


def pareto_plot(
    points: Sequence[ParetoPoint], group: Case, palette: Palette, folder: Path, budgets: Sequence[float],
    metric: Metric = "latency",
) -> Plot | None:
    """Error against latency (or peak memory) at each N: the accuracy-cost frontier. The variants
    of one implementation (an option sweep) are joined in its colour and labelled with their swept
    values; exact implementations sit on the bottom edge; the front is the grey staircase."""
    by_seq_len: dict[int, list[ParetoPoint]] = {}
    for point in points:
        by_seq_len.setdefault(curve_x(point.row.case), []).append(point)
    if not by_seq_len:
        return None
    loosest = max(budgets)
    seq_lens = sorted(by_seq_len)
    columns = min(4, len(seq_lens))
    rows = math.ceil(len(seq_lens) / columns)
    figure, grid = new_figure(3.6 * columns + 2.6, 3.2 * rows + 0.8, rows, columns, squeeze=False)
    for axes, seq_len in zip(grid.flat, seq_lens, strict=False):
        _frontier_axes(axes, by_seq_len[seq_len], palette, budgets, metric)
        axes.set_title(f"{CURVE_LABEL}={seq_len}", fontsize=9)
    for axes in list(grid.flat)[len(seq_lens):]:
        axes.set_visible(False)
    swept: dict[str, str] = {}
    for point in points:
        base, settings = _variant_settings(point.row.implementation)
        if settings:
            swept[base] = "/".join(settings)
    names = sorted({implementation_of(point.row.implementation) for point in points})
    proxies = [Line2D([], [], linestyle="none", marker="o", color=palette.implementation(name)) for name in names]
    proxies.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", color=GUIDE_COLOUR))
    labels = [f"{name} ({swept[name]})" if name in swept else name for name in names]
    figure.legend(proxies, [*labels, f"hollow: error over {loosest:g}"], fontsize=8, loc="center left",
                  bbox_to_anchor=(1.0, 0.5))
    what = "latency" if metric == "latency" else memory_name(group)
    figure.suptitle(f"Error vs {what} (o: on the Pareto front, x: beaten) — {describe_group(group)}", fontsize=10)
    figure.tight_layout()
    stem = f"{group_slug(group)}-pareto" + ("" if metric == "latency" else "-memory")
    save(figure, folder, stem)
    listed = ", ".join(f"{budget:g}" for budget in budgets)
    caption = ("Relative Frobenius error of the output against float64 exact attention. Dotted lines: the error "
               f"budgets ({listed}); hollow: over {loosest:g}. Circles are on the front (nothing else is both "
               f"{'faster' if metric == 'latency' else 'leaner'} and more accurate). The variants of an option sweep "
               "are joined and labelled with their swept values (named in the legend); exact implementations, at "
               "rounding error, are the triangles on the bottom edge.")
    return Plot(f"Error vs {what} (Pareto front per {CURVE_LABEL})", stem, caption)


def _frontier_axes(axes: Axes, entries: Sequence[ParetoPoint], palette: Palette, budgets: Sequence[float],
                   metric: Metric) -> None:
    loosest = max(budgets)
    approximate = [point.error for point in entries if point.error > ROUNDING_ERROR]
    # The error axis spans the approximations and the budgets; rounding-level errors (the exact
    # implementations) are drawn on its bottom edge rather than stretching it over 1e-7.
    bottom = min([*approximate, *budgets]) / 3
    top = max([*approximate, loosest]) * 2

    def shown(point: ParetoPoint) -> float:
        return max(point.error, bottom)

    for point in entries:
        colour = palette(point.row.implementation)
        if point.error <= bottom:
            axes.scatter(point.cost, bottom, color=colour, marker="v", s=40, zorder=3, clip_on=False)
        elif point.on_front:
            inside = within_budget(point.row, loosest)
            axes.scatter(point.cost, shown(point), s=38, zorder=3, edgecolors=colour,
                         facecolors=colour if inside else "none")
        else:
            axes.scatter(point.cost, shown(point), color=colour, marker="x", s=28, zorder=3, alpha=0.8)
    by_implementation: dict[str, list[ParetoPoint]] = {}
    for point in entries:
        by_implementation.setdefault(implementation_of(point.row.implementation), []).append(point)
    for name, variants in by_implementation.items():
        swept = sorted((point for point in variants if point.row.implementation != name), key=lambda p: p.cost)
        if len(swept) < 2:
            continue
        axes.plot([p.cost for p in swept], [shown(p) for p in swept], color=palette.implementation(name),
                  linewidth=0.8, alpha=0.6, zorder=2)
        for point in swept:
            axes.annotate("/".join(_variant_settings(point.row.implementation)[1].values()),
                          (point.cost, shown(point)), xytext=(3, 3), textcoords="offset points", fontsize=6,
                          color=palette.implementation(name))
    front = sorted((p for p in entries if p.on_front), key=lambda p: p.cost)
    if len(front) > 1:
        axes.step([p.cost for p in front], [shown(p) for p in front], where="post", color="0.6", linewidth=1,
                  zorder=1)
    for budget in budgets:
        axes.axhline(budget, color=GUIDE_COLOUR, linestyle=":", linewidth=1)
        axes.text(0.99, budget, f"budget {budget:g}", transform=axes.get_yaxis_transform(), fontsize=6,
                  color=GUIDE_COLOUR, ha="right", va="bottom")
    axes.set_yscale("log")
    axes.set_ylim(bottom, top)
    log_axes(axes, y_formatter=None, x_formatter=SECONDS if metric == "latency" else BYTES)
    memory = memory_name(entries[0].row.case) if entries else "peak memory"
    axes.set_xlabel("median latency (log)" if metric == "latency" else f"{memory} (log)", fontsize=8)
    axes.set_ylabel("relative error vs exact (log)", fontsize=8)
    axes.tick_params(labelsize=7)


def _variant_settings(name: str) -> tuple[str, dict[str, str]]:
    """A series' implementation and its swept settings as text ({} for a plain implementation)."""
    base, settings = split_series(name)
    return base, {key: str(value) for key, value in settings.items()}


def speedup_plot(curves: dict[str, list[Row]], baseline: str, group: Case, palette: Palette, folder: Path,
                 budget: float, declared: Mapping[str, Declared]) -> Plot:
    figure, axes = new_figure(8, 5.2)
    base = {curve_x(row.case): value for row in curves[baseline]
            if can_be_baseline(row) and (value := metric_value(row, "latency"))}
    seq_lens = sorted(base)
    greyed = False
    for name, points in sorted(curves.items()):
        ratios = [(curve_x(row.case), base[curve_x(row.case)] / value, is_exact(name, declared)
                   or within_budget(row, budget)) for row in points
                  if (value := result_latency(row)) and curve_x(row.case) in base]
        if not ratios or name == baseline:
            continue
        inside = [(n, ratio) for n, ratio, ok in ratios if ok]
        if inside:
            axes.plot(*zip(*inside, strict=True), marker="o", markersize=4, color=palette(name), label=name)
        outside = [(n, ratio) for n, ratio, ok in ratios if not ok]
        if outside:
            greyed = True
            axes.plot(*zip(*outside, strict=True), linestyle="none", marker="o", markersize=5,
                      markerfacecolor="none", color=OVER_BUDGET_COLOUR)
            axes.annotate(name, outside[-1], fontsize=7, color="0.5", xytext=(4, 0), textcoords="offset points")
    axes.axhline(1.0, color=GUIDE_COLOUR, linestyle="--", linewidth=1, label=f"{baseline} (= 1)")
    if greyed:
        axes.plot([], [], linestyle="none", marker="o", markerfacecolor="none", color=OVER_BUDGET_COLOUR,
                  label=f"error over {budget:g} (not comparable)")
    widen_to(axes, 4.0)
    log_axes(axes, y_formatter=TIMES, x_values=seq_lens)
    axes.set_xlabel(_curve_axis_label())
    axes.set_ylabel(f"speed-up over {baseline} (× faster, log scale)")
    axes.set_title(f"Speed-up over {baseline} — {describe_group(group)}", fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    stem = f"{group_slug(group)}-speedup"
    save(figure, folder, stem)
    caption = (f"{baseline}'s median latency divided by each one's, where both ran. An approximation's point whose "
               f"error against exact attention is over {budget:g} is a hollow grey circle: it is not faster in any "
               "useful sense.")
    return Plot(f"Speed-up over {baseline}", stem, caption)


def exponent_plot(fits: Sequence[ScalingFit], group: Case, folder: Path) -> Plot | None:
    fits = [fit for fit in fits if fit.exponent is not None]
    if not fits:
        return None
    names = sorted({fit.implementation for fit in fits})
    figure, panels = new_figure(10, 0.45 * len(names) + 1.9, 1, 2, sharey=True)
    extent = [bound for fit in fits for bound in (fit.interval or (fit.exponent, fit.exponent))]
    extent += [fit.declared_exponent for fit in fits if fit.declared_exponent is not None]
    low, high = min(-0.1, min(extent) - 0.2), max(2.6, max(extent) + 0.5)
    for axes, metric in zip(panels, ("latency", "memory"), strict=True):
        for index, name in enumerate(names):
            fit = next((f for f in fits if f.implementation == name and f.metric == metric), None)
            if fit is None:
                continue
            colour = "tab:red" if fit.verdict == "does not hold" else "tab:blue"
            below, above = (fit.exponent - fit.interval[0], fit.interval[1] - fit.exponent) if fit.interval else (0, 0)
            axes.errorbar(fit.exponent, index, xerr=[[max(below, 0)], [max(above, 0)]], fmt="o", color=colour,
                          capsize=3)
            if fit.declared_exponent is not None:
                axes.plot(fit.declared_exponent, index, marker="D", markerfacecolor="none", color="0.2", markersize=8)
            detects = f", detects +{fit.detectable:.2f}" if fit.detectable is not None else " (no interval)"
            axes.annotate(f"{fit.exponent:.2f}{detects}", (fit.exponent, index), fontsize=7, xytext=(0, 7),
                          textcoords="offset points", ha="center")
        axes.set_title(f"{metric}: measured (o, 95% interval) vs declared (◇)", fontsize=9)
        axes.set_xlabel("exponent k in cost ∝ n^k")
        axes.set_xlim(low, high)
        axes.set_ylim(-0.7, len(names) - 0.3)
        axes.axvline(0, color="0.8", linewidth=1)
        axes.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(range(len(names)), names)
    figure.suptitle(f"Scaling exponents over each curve's measured N — {describe_group(group)}", fontsize=10)
    figure.tight_layout()
    stem = f"{group_slug(group)}-exponents"
    save(figure, folder, stem)
    return Plot("Scaling exponents: declared vs measured", stem,
                "Bars: the exponent's 95% interval; red: the declaration (◇) does not hold. 'detects +x': the "
                "smallest excess over the declaration the fit would call 'does not hold' (the bound on per-operation "
                "cost across the range plus the interval's lower half); over 0.5, no 'holds' is given.")


def _guides(axes: Axes, measured: Sequence[tuple[int, float]]) -> None:
    """n and n² from the lowest measured point at the smallest seq_len to the largest seq_len;
    named in the legend, so no label sits on a curve."""
    first = min(n for n, _ in measured)
    last = max(n for n, _ in measured)
    if first == last:
        return
    anchor = min(value for n, value in measured if n == first)
    for power, label, style in ((1, "guide ∝ n", ":"), (2, "guide ∝ n²", "--")):
        axes.plot((first, last), (anchor, anchor * (last / first) ** power), linestyle=style, color=GUIDE_COLOUR,
                  linewidth=1, label=label)


def _mark_gaps(axes: Axes, curves: dict[str, list[Row]], palette: Palette, missing: Callable[[Row], bool]) -> int:
    """Crosses in a strip at the bottom (one lane per implementation), and a legend entry per
    implementation saying which points did not run and why; returns the lanes used."""
    transform = axes.get_xaxis_transform()  # x in data, y as a fraction of the axes
    all_seq_lens = sorted({curve_x(row.case) for points in curves.values() for row in points})
    lane = 0
    for name, points in sorted(curves.items()):
        gaps = [row for row in points if missing(row)]
        if not gaps:
            continue
        lane += 1
        by_status: dict[str, list[int]] = {}
        for row in gaps:
            by_status.setdefault(row.status, []).append(curve_x(row.case))
        where = "; ".join(
            f"{status} at " + (f"every {CURVE_LABEL}" if seq_lens == all_seq_lens
                                 else f"{CURVE_LABEL}={', '.join(map(str, seq_lens))}")
            for status, seq_lens in by_status.items()
        )
        xs = [curve_x(row.case) for row in gaps]
        axes.plot(xs, [GAP_LANE * (lane - 0.5)] * len(xs), linestyle="none", marker="x", color=palette(name),
                  transform=transform, clip_on=False, markersize=7, label=f"{name} not run: {where}")
    return lane


def _reserve_gap_strip(axes: Axes, lanes: int) -> None:
    """Lower the log y axis so that the lanes of "not run" crosses lie below every measured point."""
    if not lanes:
        return
    low, high = axes.get_ylim()
    strip = min(0.5, GAP_LANE * lanes + 0.02)  # of the axes' height
    decades = math.log10(high / low)
    axes.set_ylim(low / 10 ** (decades * strip / (1 - strip)), high)
    axes.axhspan(axes.get_ylim()[0], low, color="0.96", zorder=0)


def history_plot(
    runs: Sequence[str], seq_lens: Sequence[int], medians: dict[tuple[str, int], float], title: str,
    folder: Path, stem: str,
) -> None:
    """Median latency per seq_len (one line each) across runs, oldest first."""
    figure, axes = new_figure(max(6.0, 0.9 * len(runs) + 3), 4.8)
    for index, seq_len in enumerate(seq_lens):
        points = [(i, medians[(run, seq_len)]) for i, run in enumerate(runs) if (run, seq_len) in medians]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", markersize=4, label=f"{CURVE_LABEL}={seq_len}",
                      color=COLOURS[index % len(COLOURS)])
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(SECONDS)
    axes.set_xticks(range(len(runs)), runs, rotation=30, ha="right", fontsize=7)
    axes.set_xlabel("run (UTC time - commit; machine), oldest first")
    axes.set_ylabel("median latency (log scale)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    save(figure, folder, stem)


def write_history_plot(history: History, folder: Path) -> Path:
    stem = f"history-{history.implementation}-{group_slug(history.group)}"
    label = {run: f"{run}\n{history.machines[run]}" for run in history.runs}
    history_plot(list(label.values()), history.seq_lens,
                 {(label[run], n): value for (run, n), value in history.medians.items()},
                 f"{history.implementation} median latency across runs — {describe_group(history.group)}", folder, stem)
    return folder / f"{stem}.png"


def _curve_axis_label() -> str:
    axis = AXES[CURVE_AXIS]
    return f"{axis.title} ({axis.unit + ', ' if axis.unit else ''}log scale)"
