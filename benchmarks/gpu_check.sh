#!/usr/bin/env bash
# Validates attnbench on a CUDA machine in a few minutes, with no network: installs attnbench
# into the Python that has the machine's CUDA torch (without dependencies: torch, numpy, scipy,
# pandas, matplotlib, pyyaml and pluggy must be there already), then runs benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [OUTDIR] [--device cuda|cuda:N|cpu]
#
# OUTDIR defaults to results/gpu/<device name>/. --device cpu runs the same steps at CPU sizes.
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
log=$(mktemp -t attnbench-gpu-check-install.XXXXXX)
if ! "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . >"$log" 2>&1; then
  # An old setuptools, or none: run from this checkout instead (plugins/ is attnbench_plugins).
  echo "gpu_check.sh: warning: could not install attnbench into $PYTHON (see $log); running from the source tree" >&2
  source_tree=$(mktemp -d -t attnbench-source.XXXXXX)
  ln -s "$PWD/plugins" "$source_tree/attnbench_plugins"
  export PYTHONPATH="$PWD:$source_tree${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
