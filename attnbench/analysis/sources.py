"""An approximation's error on each input source at the same settings, side by side: how far
the error measured on synthetic inputs is from the error on what real models compute."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from attnbench.analysis.curves import Declared, is_exact
from attnbench.contract.case import CURVE_AXIS, Case, curve_x
from attnbench.measuring.figures import ErrorFigures
from attnbench.settings.variants import series_order
from attnbench.storage.results import Row

ANY_SOURCE = "gaussian"  # the group's inputs field once blanked (gaussian is left out of descriptions)


@dataclass(frozen=True)
class SourceErrors:
    """One group of fixed axes (the input source and N left free): each approximation's error
    figures per N and input source."""

    group: Case  # inputs and the curve axis blanked
    sources: tuple[str, ...]  # in the order they were measured
    errors: Mapping[tuple[str, int], Mapping[str, ErrorFigures]]  # (series, N) -> source -> figures


def errors_by_source(rows: Sequence[Row], declared: Mapping[str, Declared]) -> list[SourceErrors]:
    """Every group in which approximations were checked on more than one input source; points
    that did not run, or ran on one source only, are left out."""
    by_group: dict[Case, dict[tuple[str, int], dict[str, ErrorFigures]]] = defaultdict(lambda: defaultdict(dict))
    sources: dict[Case, list[str]] = defaultdict(list)
    for row in rows:
        figures = row.correctness.exact.get("out") if row.correctness else None
        if is_exact(row.implementation, declared) or figures is None or row.status != "ok":
            continue
        group = dataclasses.replace(row.case, inputs=ANY_SOURCE, **{CURVE_AXIS: 0})
        by_group[group][(row.implementation, curve_x(row.case))][row.case.inputs] = figures
        if row.case.inputs not in sources[group]:
            sources[group].append(row.case.inputs)
    tables = []
    for group, errors in by_group.items():
        compared = {key: per_source for key, per_source in errors.items() if len(per_source) > 1}
        if compared:
            ordered = dict(sorted(compared.items(), key=lambda item: (item[0][1], series_order(item[0][0]))))
            tables.append(SourceErrors(group, tuple(sources[group]), ordered))
    return tables
