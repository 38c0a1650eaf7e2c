"""Imported once by the fork server, before it forks a worker per job.

Everything here is paid once per run instead of once per case: importing torch and the
measuring code, and initialising the profiler (about a second) used for CPU memory peaks.
Nothing here may start threads or run parallel torch ops: a forked child gets no threads.
"""

import gc
import os

# torch.compile (FlexAttention's path) in a worker compiles in-process instead of starting a
# pool of compile subprocesses: starting the pool cost ~7 s per compiled point here, and
# the workers' exits leaked its semaphores (resource_tracker warnings at the end of a run).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# multiprocessing re-runs the parent's main script in each worker (the `attnbench` console
# script imports the CLI, and with it scipy): loaded here once, it costs a worker nothing. (The
# one import of a face from inside the package; tests/test_architecture.py names it. Preloading
# "__main__" instead left each worker a second slower.)
from attnbench import cli  # noqa: E402, F401
from attnbench.execution.local import worker  # noqa: E402, F401  (imports torch and the measuring code)
from attnbench.measuring.memory import initialise_profiler  # noqa: E402
from attnbench.support.confinement import set_dumpable  # noqa: E402

initialise_profiler()
# A worker confined by Landlock cannot ptrace the fork server anyway; where Landlock is missing,
# this keeps a same-user worker from writing into the process every later worker is forked from.
set_dumpable(False)
# Everything loaded so far lives as long as the server: keep it out of the children's garbage
# collections, which would otherwise walk it (0.12 s per collection) and copy its pages.
gc.freeze()
