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
if ! "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . >/tmp/attnbench-gpu-check-install.log 2>&1; then
  echo "gpu_check.sh: error: could not install attnbench into $PYTHON (needs pip and setuptools); see /tmp/attnbench-gpu-check-install.log" >&2
  exit 2
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
