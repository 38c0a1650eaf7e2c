"""What each kind of figures a row carries shows: its columns in the tidy table, its cells in the
terminal summary and in the report's table of every point.

The table, the summary and the report take these columns in this order; a new measurement adds
its entry here (besides its Row field and reader in attnbench.storage.results).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnbench.analysis.curves import (
    achieved_bandwidth,
    metric_value,
    output_error,
    result_latency,
    tokens_per_second,
)
from attnbench.contract.case import curve_x
from attnbench.contract.inputs import SOURCE_NOTE_PREFIX
from attnbench.measuring.figures import NOISY_RELATIVE_IQR, ErrorFigures, Latency
from attnbench.storage.results import Row
from attnbench.support.units import format_bytes, format_seconds


@dataclass(frozen=True)
class FigureColumns:
    figures: str  # the Row field (attnbench.storage.results.FIGURE_READERS)
    table: Callable[[Row], dict[str, Any]]  # tidy table columns; None where not measured
    summary: Callable[[Row], dict[str, str]]  # terminal summary: header -> cell
    report: Callable[[Row], dict[str, str]]  # the report's every-point table: header -> cell


def _latency_table(row: Row) -> dict[str, Any]:
    latency = row.latency
    return {
        "median_s": latency.median_s if latency else None,
        "iqr_s": latency.iqr_s if latency else None,
        "samples": len(latency.samples_s) if latency else None,
        "rounds": len(latency.round_sizes) if latency else None,
        "round_spread": latency.round_spread if latency else None,
        "pooled_median_s": latency.pooled_median_s if latency else None,
        "noisy": latency.noisy if latency else None,
        "latency_is_result": latency is not None and not row.latency_voided,
        "load_cpus": latency.load if latency else None,
        "fresh_call_ratio": latency.fresh_call_ratio if latency else None,
        "cache": latency.cache if latency else None,
        "prepare_s": latency.prepare_s if latency else None,
        "first_call_s": latency.first_call_s if latency else None,
    }


def _latency_summary(row: Row) -> dict[str, str]:
    latency = row.latency
    return {
        "median": ("flagged" if row.latency_voided else format_seconds(latency.median_s)) if latency else "",
        "IQR": f"{100 * latency.iqr_s / latency.median_s:.0f}%" if latency else "",
    }


def _latency_report(row: Row) -> dict[str, str]:
    if row.latency is None:
        return {"median": "", "IQR": ""}
    if row.latency_voided:
        return {"median": "no result (flagged)", "IQR": ""}
    return {"median": format_seconds(row.latency.median_s), "IQR": f"{row.latency.iqr_s / row.latency.median_s:.0%}"}


def _memory_table(row: Row) -> dict[str, Any]:
    memory = row.memory
    return {"allocator_peak_bytes": memory.allocator_peak_bytes if memory else None,
            "rss_peak_bytes": memory.rss_peak_bytes if memory else None,
            "state_bytes": memory.state_bytes if memory else None,
            "kept_bytes": memory.kept_bytes if memory else None}


def _memory_summary(row: Row) -> dict[str, str]:
    memory = row.memory
    cells = {"peak mem": _bytes(memory.allocator_peak_bytes) if memory else "",
             "peak RSS": _bytes(memory.rss_peak_bytes) if memory else ""}
    return {**cells, "state": _bytes(memory.state_kept_bytes) if memory else ""} if row.case.decode else cells


def _memory_report(row: Row) -> dict[str, str]:
    memory = row.memory
    cells = {"peak memory": _bytes(memory.peak_bytes) if memory else "",
             "kept between calls": _bytes(memory.kept_bytes) if memory else ""}
    return {**cells, "state kept": _bytes(memory.state_kept_bytes) if memory else ""} if row.case.decode else cells


def _grad_errors(row: Row) -> list[float]:
    correctness = row.correctness
    return [figures.max_abs for name, figures in correctness.exact.items() if name != "out"] if correctness else []


def _correctness_table(row: Row) -> dict[str, Any]:
    correctness = row.correctness
    out = correctness.exact.get("out") if correctness else None
    grads = _grad_errors(row)
    return {
        "rel_err": out.rel_fro if out else None,
        "max_abs_err": out.max_abs if out else None,
        "cosine_mean": out.cosine_mean if out else None,
        "cosine_worst": out.cosine_worst if out else None,
        "grad_max_abs_err": max(grads) if grads else None,
        "judged_against": correctness.judged_against if correctness else None,
        "within_default_tolerance": correctness.within_default_tolerance if correctness else None,
    }


def _own_error(row: Row) -> float | None:
    """Relative Frobenius error of the output against the implementation's own float64 reference
    (what it computes exactly: its sparsity pattern, its random features); None without one."""
    own = row.correctness.own if row.correctness else None
    figures = own.get("out") if own else None
    return figures.rel_fro if figures else None


def _correctness_summary(row: Row) -> dict[str, str]:
    """Against float64 softmax attention: relative Frobenius and max abs error of the output, and
    against the implementation's own reference where it has one; in training mode also the
    largest max abs error of dq, dk, dv."""
    out = row.correctness.exact.get("out") if row.correctness else None
    cells = {"error": _scientific(out.rel_fro if out else None), "vs own ref": _scientific(_own_error(row)),
             "max abs err": _scientific(out.max_abs if out else None)}
    if row.case.backward:
        grads = _grad_errors(row)
        cells["grad err"] = _scientific(max(grads) if grads else None)
    return cells


def _correctness_report(row: Row) -> dict[str, str]:
    out = row.correctness.exact.get("out") if row.correctness else None
    return {"error vs exact": _scientific(output_error(row)), "vs own reference": _scientific(_own_error(row)),
            "cosine mean / worst": _cosines(out)}


def _cosines(figures: ErrorFigures | None) -> str:
    """'0.9987 / 0.912': four decimals, where 1 - cosine is what differs between good methods."""
    if figures is None or figures.cosine_mean is None or figures.cosine_worst is None:
        return ""
    return f"{figures.cosine_mean:.4f} / {figures.cosine_worst:.4f}"


def _scientific(value: float | None) -> str:
    return f"{value:.2e}" if value is not None and math.isfinite(value) else ("nan" if value is not None else "")


def _bytes(value: int | None) -> str:
    return format_bytes(value) if value is not None else ""


def _work_table(row: Row) -> dict[str, Any]:
    work, latency = row.work, result_latency(row)
    # As the throughput table: none without a latency that is a result, or for a declaration it makes implausible.
    achieved = work.flops / latency if work and latency and not row.throughput_voided else None
    return {"flops": work.flops if work else None, "flop_formula": work.formula if work else None,
            "achieved_flops_per_s": achieved}


def _work_summary(row: Row) -> dict[str, str]:
    achieved = _work_table(row)["achieved_flops_per_s"]
    return {"GFLOP/s": f"{achieved / 1e9:.3g}" if achieved else ""}


def _traffic_table(row: Row) -> dict[str, Any]:
    traffic = row.traffic
    achieved = achieved_bandwidth(row)
    return {"step_bytes": traffic.bytes if traffic else None,
            "step_bytes_formula": traffic.formula if traffic else None,
            "achieved_bytes_per_s": achieved,
            "tokens_per_s": tokens_per_second(row)}


def _traffic_cells(row: Row) -> dict[str, str]:
    """A decode step's achieved bandwidth and tokens per second (nothing outside decode)."""
    if not row.case.decode:
        return {}
    achieved, tokens = achieved_bandwidth(row), tokens_per_second(row)
    return {"GB/s": f"{achieved / 1e9:.3g}" if achieved else "", "tok/s": f"{tokens:.4g}" if tokens else ""}


# The error comes first, beside the status: "ok" next to an error of 2.7 must not read as good.
COLUMNS: tuple[FigureColumns, ...] = (
    FigureColumns("correctness", _correctness_table, _correctness_summary, _correctness_report),
    FigureColumns("latency", _latency_table, _latency_summary, _latency_report),
    FigureColumns("memory", _memory_table, _memory_summary, _memory_report),
    FigureColumns("work", _work_table, _work_summary, _work_summary),
    FigureColumns("traffic", _traffic_table, _traffic_cells, _traffic_cells),
)


def table_columns(row: Row) -> dict[str, Any]:
    return {name: value for kind in COLUMNS for name, value in kind.table(row).items()}


def summary_cells(row: Row) -> dict[str, str]:
    return {header: cell for kind in COLUMNS for header, cell in kind.summary(row).items()}


def report_cells(row: Row) -> dict[str, str]:
    return {header: cell for kind in COLUMNS for header, cell in kind.report(row).items()}


def point_note(row: Row) -> str:
    """Everything said about a point beside its figures: a noisy latency, the harness's flags,
    the reasons it did not run or was judged incorrect, the implementation's own notes."""
    latency = row.latency
    noise = [f"noisy: {_noise(latency)}"] if latency is not None and latency.noisy and row.status == "ok" else []
    notes = (note for note in row.notes if not note.startswith(SOURCE_NOTE_PREFIX))  # gathered in the run's facts
    return "; ".join((*noise, *(flag.message for flag in row.flags), *row.reasons, *notes))


def _noise(latency: Latency) -> str:
    """What made the latency noisy: the spread within its best round, or between its rounds."""
    parts = []
    if latency.iqr_s > NOISY_RELATIVE_IQR * latency.median_s:
        parts.append(f"IQR {latency.iqr_s / latency.median_s:.0%} of median")
    if latency.round_spread > NOISY_RELATIVE_IQR:
        parts.append(f"rounds {latency.round_spread:.0%} apart")
    return ", ".join(parts)


def speed_order(row: Row) -> tuple[int, bool, float, str]:
    """Points listed by N, then fastest first, then those without a latency by name."""
    latency = metric_value(row, "latency")
    return curve_x(row.case), latency is None, latency if latency is not None else math.inf, row.implementation
