"""How every figure looks: matplotlib set up for files, colours readable on white, log axes with
enough labelled ticks to read a 4× difference, and reproducible files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.colors

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from attnbench.settings.variants import series_order, split_series  # noqa: E402

FORMATS = ("png", "svg")
DPI = 110
# Distinct on white, none light: tab10 without its olive and grey (the guides' colour), then
# darker tones of the same hues.
COLOURS: tuple[str, ...] = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                            "#393b79", "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d")
GUIDE_COLOUR = "0.45"
OVER_BUDGET_COLOUR = "0.7"


class Palette:
    """One colour per implementation, the same in every figure of a report; the variants of one
    implementation (an option sweep) take shades of its colour, darkest first."""

    def __init__(self, names: Sequence[str]) -> None:
        series: dict[str, list[str]] = {}
        for name in sorted(set(names), key=series_order):
            series.setdefault(implementation_of(name), []).append(name)
        self._base = {base: COLOURS[i % len(COLOURS)] for i, base in enumerate(sorted(series))}
        self._colours = {name: _shade(self._base[base], index, len(variants))
                         for base, variants in series.items() for index, name in enumerate(variants)}

    def __call__(self, name: str) -> str:
        return self._colours[name]

    def implementation(self, name: str) -> str:
        """The colour of an implementation as a whole (its variants are shades of it)."""
        return self._base[name]


def implementation_of(name: str) -> str:
    """The implementation a series runs (a variant's, or the name itself)."""
    return split_series(name)[0]


def _shade(colour: str, index: int, count: int) -> str:
    """``colour`` darkened (first) to lightened (last) across ``count`` variants."""
    if count == 1:
        return colour
    red, green, blue = matplotlib.colors.to_rgb(colour)
    amount = -0.45 + 0.9 * index / (count - 1)  # -: toward black, +: toward white
    target = 1.0 if amount > 0 else 0.0
    mixed = [channel + abs(amount) * (target - channel) for channel in (red, green, blue)]
    return matplotlib.colors.to_hex(mixed)


def log_axes(axes: Axes, y_formatter: FuncFormatter | None, x_formatter: FuncFormatter | None = None,
             x_values: Sequence[float] = ()) -> None:
    """Log axes. The x axis ticks at the measured seq_lens (or, with a formatter, at 1-2-5 steps);
    the y axis at 1-2-5 steps, or finer where it spans less than two decades."""
    axes.set_xscale("log", base=2 if x_formatter is None else 10)
    axes.set_yscale("log")
    if x_formatter is None:
        if x_values:
            axes.xaxis.set_major_locator(FixedLocator(sorted(set(x_values))))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    elif x_formatter is BYTES:  # powers of two (of four over a wide range): 1, 4, 16 MiB
        low, high = axes.get_xlim()
        axes.xaxis.set_major_locator(LogLocator(base=2 if high / low <= 32 else 4))
        axes.xaxis.set_major_formatter(x_formatter)
    else:
        axes.xaxis.set_major_locator(LogLocator(base=10, subs=_subs(axes.get_xlim())))
        axes.xaxis.set_major_formatter(x_formatter)
    axes.xaxis.set_minor_formatter(NullFormatter())
    if y_formatter is BYTES:  # powers of two: 1, 2, 4 MiB rather than 0.954 MiB
        low, high = axes.get_ylim()
        axes.yaxis.set_major_locator(LogLocator(base=2, subs=(1.0, 1.5) if high / low <= 8 else (1.0,)))
    elif y_formatter is not None:
        axes.yaxis.set_major_locator(LogLocator(base=10, subs=_subs(axes.get_ylim())))
    if y_formatter is not None:
        axes.yaxis.set_major_formatter(y_formatter)
        axes.yaxis.set_minor_formatter(NullFormatter())
    axes.grid(which="major", alpha=0.3)


def _subs(limits: tuple[float, float]) -> tuple[float, ...]:
    low, high = (max(value, 1e-300) for value in limits)
    decades = abs(math.log10(high / low))
    if decades <= 1.5:
        return (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    if decades <= 5:
        return (1.0, 2.0, 5.0)
    return (1.0,)


def widen_to(axes: Axes, factor: float) -> None:
    """Log y limits spanning at least ``factor``, centred on what is drawn: a flat curve still
    gets several labelled ticks."""
    axes.set_yscale("log")
    low, high = axes.get_ylim()
    if high / low >= factor:
        return
    centre = math.sqrt(low * high)
    axes.set_ylim(centre / math.sqrt(factor), centre * math.sqrt(factor))


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


SECONDS = FuncFormatter(_short_seconds)
BYTES = FuncFormatter(_short_bytes)
TIMES = FuncFormatter(lambda value, _: f"{value:g}×")


def new_figure(width: float, height: float, rows: int = 1, columns: int = 1, **options: object) -> tuple[Figure, Any]:
    """A figure and its axes (an array of them for a grid)."""
    return plt.subplots(rows, columns, figsize=(width, height), **options)


def save(figure: Figure, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for extension in FORMATS:
        # No timestamps or random ids in the files: the same rows give the same bytes.
        metadata = {"Date": None} if extension == "svg" else {"Software": None}
        with matplotlib.rc_context({"svg.hashsalt": "attnbench"}):
            figure.savefig(folder / f"{stem}.{extension}", dpi=DPI, bbox_inches="tight", metadata=metadata)
    plt.close(figure)
