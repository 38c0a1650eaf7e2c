"""The scaling verdicts of several runs, per implementation: in how many runs any of its curves
'does not hold', and how its fits split between the verdicts.

    python benchmarks/verdict_tally.py RUN_DIR [RUN_DIR ...]

A RUN_DIR is a run folder or a folder holding them (``--output`` of ``attnbench run``). It reads
the runs with attnbench's own loading and analysis, as ``attnbench report`` does.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

from attnbench.analysis.scaling import scaling_fits
from attnbench.contract.case import describe_group
from attnbench.presenting.summary import format_table
from attnbench.storage.run_folder import ROWS_FILE, load_run

VERDICTS = ("holds", "undetermined", "does not hold")


def main(argv: list[str]) -> int:
    folders = [rows.parent for folder in map(Path, argv) for rows in sorted(folder.rglob(ROWS_FILE))]
    if not folders:
        print("usage: verdict_tally.py RUN_DIR [RUN_DIR ...] (no rows.jsonl under them)", file=sys.stderr)
        return 2
    failed_runs: dict[str, int] = Counter()
    fits_by: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    failures = []
    for folder in folders:
        run = load_run(folder)
        failed = set()
        for fit in scaling_fits(run.rows, run.declared):
            if fit.exponent is None:
                continue
            fits_by[(fit.implementation, fit.metric)][fit.verdict] += 1
            failed_runs.setdefault(fit.implementation, 0)
            if fit.verdict == "does not hold":
                failed.add(fit.implementation)
                failures.append(f"{folder.name}: {fit.implementation} {fit.metric} {describe_group(fit.group)}: "
                                f"{fit.sentence()}")
        for name in failed:
            failed_runs[name] += 1
    lines = [(name, metric, *(str(counts[verdict]) for verdict in VERDICTS), f"{failed_runs[name]}/{len(folders)}")
             for (name, metric), counts in sorted(fits_by.items())]
    print(f"{len(folders)} runs; fits per verdict, and the runs in which any of the implementation's fits "
          "'does not hold'")
    print(format_table(("implementation", "metric", *VERDICTS, "runs failed"), lines))
    print("\n".join(["", *failures]) if failures else "\nno fit 'does not hold'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
