"""The tidy table of a run: one line per row, one column per variable (pandas), for CSV and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from attnbench.contract.case import AXES
from attnbench.storage.results import Row

CASE_COLUMNS = tuple(AXES)


def tidy_frame(rows: Sequence[Row]) -> pd.DataFrame:
    records = []
    for row in rows:
        case = row.case.to_json()
        latency, memory, correctness = row.latency, row.memory, row.correctness
        out = correctness.exact.get("out") if correctness else None
        grads = [figures.max_abs for name, figures in correctness.exact.items() if name != "out"] if correctness else []
        records.append({
            "run_id": row.run_id,
            "implementation": row.implementation,
            **{column: case[column] for column in CASE_COLUMNS},
            "status": row.status,
            "median_s": latency.median_s if latency else None,
            "iqr_s": latency.iqr_s if latency else None,
            "samples": len(latency.samples_s) if latency else None,
            "rounds": len(latency.round_sizes) if latency else None,
            "round_spread": latency.round_spread if latency else None,
            "pooled_median_s": latency.pooled_median_s if latency else None,
            "noisy": latency.noisy if latency else None,
            "allocator_peak_bytes": memory.allocator_peak_bytes if memory else None,
            "rss_peak_bytes": memory.rss_peak_bytes if memory else None,
            "rel_err": out.rel_fro if out else None,
            "max_abs_err": out.max_abs if out else None,
            "grad_max_abs_err": max(grads) if grads else None,
            "judged_against": correctness.judged_against if correctness else None,
            "options": json.dumps(dict(row.options), sort_keys=True),
            "reasons": "; ".join(row.reasons),
            "notes": "; ".join(row.notes),
            "flags": "; ".join(flag.kind for flag in row.flags),
            "latency_is_result": latency is not None and not row.latency_voided,
            "load_cpus": latency.load if latency else None,
            "fresh_call_ratio": latency.fresh_call_ratio if latency else None,
            "within_default_tolerance": correctness.within_default_tolerance if correctness else None,
        })
    return pd.DataFrame.from_records(records)
