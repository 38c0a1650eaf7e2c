"""asv benchmarks of every implementation attnbench can load (see asv.conf.json).

asv takes this file from the working tree for every commit it measures and finds the
parameters once, so they are fixed lists here, never read from the registry of the commit
being measured: a name that commit does not register, or a point it cannot run, raises
NotImplementedError in setup and asv records it as skipped ("n/a"). The registry decides what
runs; this list only has to contain every name, which tests/test_asv_benchmarks.py checks for
the built-ins. Third-party plugins add theirs with ATTNBENCH_ASV_EXTRA=name,name.

Latency is timed by asv; peak memory and error are attnbench's own measurements of the same
point, reported as track_ benchmarks (asv's peakmem_ would count the whole process and its
set-up, and mem_ cannot see tensors).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

try:  # imported here, so that asv's fork server holds torch and each benchmark starts warm
    from attnbench.contract.errors import NotSupported
    from attnbench.tracking import point, point_figures, prepared_call
except ImportError as error:  # a commit from before attnbench.tracking: every point is n/a
    MISSING = f"this commit has no attnbench.tracking ({error})"
else:
    MISSING = ""

# A variant (an implementation at other options, as a suite's option sweep names it) is a
# series of its own: the cheap settings of the approximations, tracked beside their defaults.
VARIANTS = ["nystrom[landmarks=64]", "performer[features=64]"]
IMPLEMENTATIONS = sorted(
    {"axial", "flash", "flex", "hybrid", "naive", "nystrom", "performer", "sdpa_cudnn", "sdpa_mem_efficient", "sparse",
     "xformers"}
    | set(VARIANTS)
    | {name for name in os.environ.get("ATTNBENCH_ASV_EXTRA", "").split(",") if name}
)
SEQ_LENS = [256, 1024, 2048]
# batch × heads × head_dim, and masking; 8 heads in all, so that naive's scores at N=2048
# stay at 128 MiB.
SHAPES = ["b1-h8-d64", "b1-h8-d64-causal", "b2-h4-d128"]
MODES = ["forward", "forward_backward"]
# No compilation in a point that is started afresh for every repeat: FlexAttention's compile
# would be most of the time; the blocked path runs the same mask.
OPTIONS = {"sparse": {"backend": "blocked"}}
PARAMS = [IMPLEMENTATIONS, SEQ_LENS, SHAPES, MODES]
PARAM_NAMES = ["implementation", "seq_len", "shape", "mode"]


def _case(seq_len: int, shape: str, mode: str):
    if MISSING:
        raise NotImplementedError(MISSING)
    batch, heads, head_dim, *masking = shape.split("-")
    return point(seq_len, batch=int(batch[1:]), heads=int(heads[1:]), head_dim=int(head_dim[1:]),
                 causal=masking == ["causal"], mode=mode)


class Latency:
    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300
    # One call per sample, 3 to 5 samples or 4 s per process (asv runs 2 processes per point).
    number = 1
    repeat = (3, 5, 4.0)

    def setup(self, implementation: str, seq_len: int, shape: str, mode: str) -> None:
        try:
            self.call = prepared_call(implementation, _case(seq_len, shape, mode), OPTIONS.get(implementation))
        except NotSupported as reasons:
            raise NotImplementedError(str(reasons)) from None

    def time_attention(self, implementation: str, seq_len: int, shape: str, mode: str) -> None:
        self.call()


class Figures:
    """attnbench's own peak memory and error of each point, measured once per commit."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 900

    def setup_cache(self) -> dict:
        return measure_figures(itertools.product(*PARAMS))

    setup_cache.timeout = 900

    def setup(self, figures: dict, implementation: str, seq_len: int, shape: str, mode: str) -> None:
        found = figures[(implementation, seq_len, shape, mode)]
        if isinstance(found, str):  # why the point cannot run
            raise NotImplementedError(found)
        self.figures = found

    def track_peak_memory(self, figures: dict, implementation: str, seq_len: int, shape: str, mode: str) -> float:
        if self.figures.peak_bytes is None:
            raise NotImplementedError("no peak memory on this device")
        return self.figures.peak_bytes / 2**20

    track_peak_memory.unit = "MiB"

    def track_error(self, figures: dict, implementation: str, seq_len: int, shape: str, mode: str) -> float:
        return self.figures.error

    track_error.unit = "relative error vs float64"


def measure_figures(keys: Iterable[tuple[str, int, str, str]]) -> dict:
    """(implementation, seq_len, shape, mode) -> its Figures, or why it cannot run."""
    figures = {}
    for implementation, seq_len, shape, mode in keys:
        try:
            case = _case(seq_len, shape, mode)
            figures[(implementation, seq_len, shape, mode)] = point_figures(
                implementation, case, OPTIONS.get(implementation))
        except (NotImplementedError, NotSupported) as reasons:
            figures[(implementation, seq_len, shape, mode)] = str(reasons)
    return figures
