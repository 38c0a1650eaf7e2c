"""The tidy table of a run: one line per row, one column per variable (pandas), for CSV and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from attnbench.contract.case import AXES
from attnbench.presenting.columns import table_columns
from attnbench.storage.results import Row

CASE_COLUMNS = tuple(AXES)


def tidy_frame(rows: Sequence[Row]) -> pd.DataFrame:
    records = []
    for row in rows:
        case = row.case.to_json()
        records.append({
            "run_id": row.run_id,
            "implementation": row.implementation,
            **{column: case[column] for column in CASE_COLUMNS},
            "status": row.status,
            **table_columns(row),
            "options": json.dumps(dict(row.options), sort_keys=True),
            "reasons": "; ".join(row.reasons),
            "notes": "; ".join(row.notes),
            "flags": "; ".join(flag.kind for flag in row.flags),
        })
    return pd.DataFrame.from_records(records)
