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

import os

IMPLEMENTATIONS = sorted(
    {"axial", "flash", "hybrid", "naive", "nystrom", "performer", "sparse", "xformers"}
    | {name for name in os.environ.get("ATTNBENCH_ASV_EXTRA", "").split(",") if name}
)
SEQ_LENS = [256, 1024, 4096]
# batch × heads × head_dim, and masking; at most 8 heads in all, so that naive at N=4096
# stays near half a GiB.
SHAPES = ["b1-h8-d64", "b1-h8-d64-causal", "b2-h4-d128"]
MODES = ["forward", "forward_backward"]
# No compilation in a point that is started afresh for every repeat: FlexAttention's compile
# would be most of the time; the blocked path runs the same mask.
OPTIONS = {"sparse": {"backend": "blocked"}}


def _case(seq_len: int, shape: str, mode: str):
    try:
        from attnbench.tracking import point
    except ImportError as error:  # a commit from before attnbench.tracking existed
        raise NotImplementedError(f"this commit has no attnbench.tracking ({error})") from None
    batch, heads, head_dim, *masking = shape.split("-")
    return point(seq_len, batch=int(batch[1:]), heads=int(heads[1:]), head_dim=int(head_dim[1:]),
                 causal=masking == ["causal"], mode=mode)


def _not_supported():
    from attnbench.errors import NotSupported

    return NotSupported


class Latency:
    params = [IMPLEMENTATIONS, SEQ_LENS, SHAPES, MODES]
    param_names = ["implementation", "seq_len", "shape", "mode"]
    timeout = 300
    # A few samples per repeat: the slowest points take seconds.
    number = 1
    repeat = (3, 10, 20.0)
    min_run_count = 3

    def setup(self, implementation: str, seq_len: int, shape: str, mode: str) -> None:
        from attnbench.tracking import prepared_call

        try:
            self.call = prepared_call(implementation, _case(seq_len, shape, mode), OPTIONS.get(implementation))
        except _not_supported() as reasons:
            raise NotImplementedError(str(reasons)) from None

    def time_attention(self, implementation: str, seq_len: int, shape: str, mode: str) -> None:
        self.call()


class Figures:
    """attnbench's own peak memory and error for each point, one measurement per point."""

    params = Latency.params
    param_names = Latency.param_names
    timeout = 300

    def setup(self, implementation: str, seq_len: int, shape: str, mode: str) -> None:
        from attnbench.tracking import point_figures

        try:
            self.figures = point_figures(implementation, _case(seq_len, shape, mode), OPTIONS.get(implementation))
        except _not_supported() as reasons:
            raise NotImplementedError(str(reasons)) from None

    def track_peak_memory(self, implementation: str, seq_len: int, shape: str, mode: str) -> float:
        if self.figures.peak_bytes is None:
            raise NotImplementedError("no peak memory on this device")
        return self.figures.peak_bytes / 2**20

    track_peak_memory.unit = "MiB"

    def track_error(self, implementation: str, seq_len: int, shape: str, mode: str) -> float:
        return self.figures.error

    track_error.unit = "relative error vs float64"
