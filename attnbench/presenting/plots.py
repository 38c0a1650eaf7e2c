"""The run's figures (matplotlib), per group of fixed axes: latency and memory against seq_len
(log-log, with n and n² guides), error against latency (the Pareto front), speed-up over the
baseline, and the measured scaling exponents beside the declared ones.

Points that did not run are drawn as crosses on the bottom edge, labelled with their status,
so a gap in a curve is never silent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from attnbench.analysis.curves import Metric, ParetoPoint, ScalingFit, can_be_baseline, metric_value  # noqa: E402
from attnbench.analysis.history import History  # noqa: E402
from attnbench.contract.case import AXES, CURVE_AXIS, CURVE_LABEL, Case, curve_x, describe_group  # noqa: E402
from attnbench.storage.results import Row  # noqa: E402

FORMATS = ("png", "svg")
DPI = 110
COLOURS = plt.get_cmap("tab10").colors


@dataclass(frozen=True)
class Plot:
    title: str
    stem: str  # file name without extension, inside the plots folder
    caption: str


def group_slug(group: Case) -> str:
    text = describe_group(group)
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


class Palette:
    """One colour per implementation, the same in every figure of a report."""

    def __init__(self, names: Sequence[str]) -> None:
        self._colours = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(sorted(set(names)))}

    def __call__(self, name: str) -> tuple[float, float, float]:
        return self._colours[name]


def scaling_plot(
    curves: dict[str, list[Row]], metric: Metric, group: Case, palette: Palette, folder: Path
) -> Plot:
    figure, axes = plt.subplots(figsize=(8, 5.2))
    measured_values = []
    for name, points in sorted(curves.items()):
        ran = [(curve_x(row.case), value) for row in points if (value := metric_value(row, metric)) is not None]
        if ran:
            xs, ys = zip(*ran, strict=True)
            axes.plot(xs, ys, marker="o", markersize=4, color=palette(name), label=name)
            measured_values.extend(ys)
    if measured_values:
        _guides(axes, curves, metric, measured_values)
    _log_axes(axes, y_formatter=_seconds if metric == "latency" else _bytes, y_base=10 if metric == "latency" else 4)
    _mark_gaps(axes, curves, palette, lambda row: metric_value(row, metric) is None)
    what = "median latency" if metric == "latency" else "peak memory (torch allocator)"
    axes.set_ylabel(f"{what} ({'time' if metric == 'latency' else 'bytes'}, log scale)")
    axes.set_xlabel(_curve_axis_label())
    axes.set_title(f"{what} vs {CURVE_LABEL} — {describe_group(group)}", fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    stem = f"{group_slug(group)}-{metric}"
    _save(figure, folder, stem)
    caption = ("Dashed guides grow as n and n² from the first measured point; crosses on the bottom edge "
               "are points that did not run, labelled with their status.")
    return Plot(f"{what.capitalize()} vs sequence length", stem, caption)


def pareto_plot(points: Sequence[ParetoPoint], group: Case, palette: Palette, folder: Path) -> Plot | None:
    by_seq_len: dict[int, list[ParetoPoint]] = {}
    for point in points:
        by_seq_len.setdefault(curve_x(point.row.case), []).append(point)
    if not by_seq_len:
        return None
    seq_lens = sorted(by_seq_len)
    columns = min(4, len(seq_lens))
    rows = math.ceil(len(seq_lens) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.4 * columns + 1.6, 3.0 * rows + 0.6), squeeze=False)
    for axes, seq_len in zip(grid.flat, seq_lens, strict=False):
        entries = by_seq_len[seq_len]
        for point in entries:
            axes.scatter(point.row.latency.median_s, max(point.error, 1e-12), color=palette(point.row.implementation),
                         marker="o" if point.on_front else "x", s=36 if point.on_front else 28)
        front = sorted((p for p in entries if p.on_front), key=lambda p: p.row.latency.median_s)
        if len(front) > 1:
            axes.step([p.row.latency.median_s for p in front], [max(p.error, 1e-12) for p in front],
                      where="post", color="0.6", linewidth=1, zorder=0)
        _log_axes(axes, y_formatter=None, x_formatter=_seconds)
        axes.set_title(f"{CURVE_LABEL}={seq_len}", fontsize=9)
        axes.set_xlabel("median latency (log)", fontsize=8)
        axes.set_ylabel("relative error vs exact (log)", fontsize=8)
        axes.tick_params(labelsize=7)
    for axes in list(grid.flat)[len(seq_lens):]:
        axes.set_visible(False)
    names = sorted({point.row.implementation for point in points})
    proxies = [Line2D([], [], linestyle="none", marker="o", color=palette(name)) for name in names]
    figure.legend(proxies, names, fontsize=8, loc="upper right")
    figure.suptitle(f"Error vs latency (o: on the Pareto front, x: beaten) — {describe_group(group)}", fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.86, 0.95))
    stem = f"{group_slug(group)}-pareto"
    _save(figure, folder, stem)
    caption = ("Relative Frobenius error of the output against float64 exact attention; exact implementations "
               "sit near 1e-7. Circles are on the front (nothing else is both faster and more accurate).")
    return Plot(f"Error vs latency (Pareto front per {CURVE_LABEL})", stem, caption)


def speedup_plot(curves: dict[str, list[Row]], baseline: str, group: Case, palette: Palette, folder: Path) -> Plot:
    figure, axes = plt.subplots(figsize=(8, 5.2))
    base = {curve_x(row.case): value for row in curves[baseline]
            if can_be_baseline(row) and (value := metric_value(row, "latency"))}
    for name, points in sorted(curves.items()):
        ratios = [(curve_x(row.case), base[curve_x(row.case)] / value) for row in points
                  if (value := metric_value(row, "latency")) and curve_x(row.case) in base]
        if ratios and name != baseline:
            xs, ys = zip(*ratios, strict=True)
            axes.plot(xs, ys, marker="o", markersize=4, color=palette(name), label=name)
    axes.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label=f"{baseline} (= 1)")
    _log_axes(axes, y_formatter=FuncFormatter(lambda value, _: f"{value:g}×"))
    axes.set_xlabel(_curve_axis_label())
    axes.set_ylabel(f"speed-up over {baseline} (× faster, log scale)")
    axes.set_title(f"Speed-up over {baseline} — {describe_group(group)}", fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    stem = f"{group_slug(group)}-speedup"
    _save(figure, folder, stem)
    caption = f"{baseline}'s median latency divided by each one's, where both ran."
    return Plot(f"Speed-up over {baseline}", stem, caption)


def exponent_plot(fits: Sequence[ScalingFit], group: Case, folder: Path) -> Plot | None:
    fits = [fit for fit in fits if fit.exponent is not None]
    if not fits:
        return None
    names = sorted({fit.implementation for fit in fits})
    figure, panels = plt.subplots(1, 2, figsize=(9, 0.45 * len(names) + 1.8), sharey=True)
    for axes, metric in zip(panels, ("latency", "memory"), strict=True):
        for index, name in enumerate(names):
            fit = next((f for f in fits if f.implementation == name and f.metric == metric), None)
            if fit is None:
                continue
            colour = "tab:red" if fit.verdict == "does not hold" else "tab:blue"
            allowance = fit.allowance if fit.allowance is not None else 0
            axes.errorbar(fit.exponent, index, xerr=allowance, fmt="o", color=colour, capsize=3)
            if fit.declared_exponent is not None:
                axes.plot(fit.declared_exponent, index, marker="D", markerfacecolor="none", color="0.2", markersize=8)
        axes.set_title(f"{metric}: measured (o, ± allowance) vs declared (◇)", fontsize=9)
        axes.set_xlabel("exponent k in cost ∝ n^k")
        axes.set_xlim(-0.1, 2.6)
        axes.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(range(len(names)), names)
    figure.suptitle(f"Scaling exponents over each one's largest points — {describe_group(group)}", fontsize=10)
    figure.tight_layout()
    stem = f"{group_slug(group)}-exponents"
    _save(figure, folder, stem)
    return Plot("Scaling exponents: declared vs measured", stem,
                "Bars: the allowance (0.2 plus the fit's 95% confidence half-width); a declaration (◇) left of "
                "its bar does not hold (red). Fits of fewer than 3 points have no bar and no verdict.")


def _guides(axes: Axes, curves: dict[str, list[Row]], metric: Metric, values: list[float]) -> None:
    seq_lens = sorted({curve_x(row.case) for points in curves.values() for row in points})
    first, last = seq_lens[0], seq_lens[-1]
    anchor = math.exp(sum(math.log(v) for v in values) / len(values))  # geometric mean: mid-plot
    middle = math.sqrt(first * last)
    for power, label in ((1, "∝ n"), (2, "∝ n²")):
        ys = [anchor * (n / middle) ** power for n in (first, last)]
        axes.plot((first, last), ys, linestyle="--", color="0.55", linewidth=1)
        axes.annotate(label, (last, ys[1]), fontsize=8, color="0.35", xytext=(3, 0), textcoords="offset points")


def _mark_gaps(axes: Axes, curves: dict[str, list[Row]], palette: Palette, missing: Callable[[Row], bool]) -> None:
    """Crosses on the bottom edge (one height per implementation), and a legend entry per
    implementation saying which points did not run and why."""
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
        axes.plot(xs, [0.025 * lane] * len(xs), linestyle="none", marker="x", color=palette(name),
                  transform=transform, clip_on=False, markersize=7, label=f"{name} not run: {where}")


def _log_axes(
    axes: Axes, y_formatter: FuncFormatter | None, x_formatter: FuncFormatter | None = None, y_base: int = 10
) -> None:
    """Log axes; bytes tick at powers of 4 (1 MiB, 4 MiB, ...), times and errors at powers of 10."""
    axes.set_xscale("log", base=2 if x_formatter is None else 10)
    axes.set_yscale("log")
    if x_formatter is None:
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    else:
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
        axes.xaxis.set_major_formatter(x_formatter)
    axes.xaxis.set_minor_formatter(NullFormatter())
    if y_formatter is not None:
        axes.yaxis.set_major_locator(LogLocator(base=y_base))
        axes.yaxis.set_major_formatter(y_formatter)
        axes.yaxis.set_minor_formatter(NullFormatter())
    axes.grid(which="major", alpha=0.3)


def _short_seconds(value: float, _: object = None) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value * 1e9:.3g} ns" if value > 0 else ""


def _short_bytes(value: float, _: object = None) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B" if value > 0 else ""


_seconds = FuncFormatter(_short_seconds)
_bytes = FuncFormatter(_short_bytes)


def _save(figure: Figure, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for extension in FORMATS:
        # No timestamps or random ids in the files: the same rows give the same bytes.
        metadata = {"Date": None} if extension == "svg" else {"Software": None}
        with matplotlib.rc_context({"svg.hashsalt": "attnbench"}):
            figure.savefig(folder / f"{stem}.{extension}", dpi=DPI, bbox_inches="tight", metadata=metadata)
    plt.close(figure)


def history_plot(
    runs: Sequence[str], seq_lens: Sequence[int], medians: dict[tuple[str, int], float], title: str,
    folder: Path, stem: str,
) -> None:
    """Median latency per seq_len (one line each) across runs, oldest first."""
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(runs) + 3), 4.8))
    colours = plt.get_cmap("viridis")
    for index, seq_len in enumerate(seq_lens):
        points = [(i, medians[(run, seq_len)]) for i, run in enumerate(runs) if (run, seq_len) in medians]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", markersize=4, label=f"{CURVE_LABEL}={seq_len}",
                      color=colours(index / max(1, len(seq_lens) - 1)))
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(_seconds)
    axes.set_xticks(range(len(runs)), runs, rotation=30, ha="right", fontsize=7)
    axes.set_xlabel("run (UTC time - commit), oldest first")
    axes.set_ylabel("median latency (log scale)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _save(figure, folder, stem)


def write_history_plot(history: History, folder: Path) -> Path:
    stem = f"history-{history.implementation}-{group_slug(history.group)}"
    history_plot(history.runs, history.seq_lens, history.medians,
                 f"{history.implementation} median latency across runs — {describe_group(history.group)}", folder, stem)
    return folder / f"{stem}.png"


def _curve_axis_label() -> str:
    axis = AXES[CURVE_AXIS]
    return f"{axis.title} ({axis.unit + ', ' if axis.unit else ''}log scale)"
