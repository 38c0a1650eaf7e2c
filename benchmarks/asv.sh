#!/usr/bin/env bash
# attnbench's asv commands (see asv.conf.json and benchmarks/attention.py). Run from anywhere;
# asv is in the test extra of this checkout's .venv (README's test command installs it).
#
#   benchmarks/asv.sh record            the checked-out commit, in .venv, into results/asv
#   benchmarks/asv.sh range A..B        every commit of a git range, each built into its own
#                                       virtualenv (CPU torch pinned by asv.conf.json), into results/asv
#   benchmarks/asv.sh gate BASE [HEAD]  asv continuous: BASE and HEAD (default: the checked-out
#                                       commit) measured interleaved; exits 1 when a benchmark got
#                                       slower by more than FACTOR (default 1.5, see README), 2
#                                       when asv could not build or run them
#   benchmarks/asv.sh quick             every benchmark once at its smallest points (CI: a broken
#                                       benchmark fails, nothing is saved)
#   benchmarks/asv.sh publish           the results as a website in .asv/html
#
# Extra arguments go to asv, e.g. `benchmarks/asv.sh record -b "time_attention\('naive'"`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${ATTNBENCH_PYTHON:-.venv/bin/python}
asv() { "$python" -m asv "$@"; }

# asv refuses to run before it has a machine file; --yes takes the defaults it detects.
[ -f "${ASV_MACHINE_FILE:-$HOME/.asv-machine.json}" ] || asv machine --yes >/dev/null

command=${1:-}
shift || true
case "$command" in
    record)
        # asv names an existing environment after its interpreter's path, so each checkout would
        # start its own series: run it through a link at a fixed place instead.
        link=${ATTNBENCH_ASV_VENV_LINK:-$HOME/.cache/attnbench/asv-venv}
        mkdir -p "$(dirname "$link")"
        ln -sfn "$(cd "$(dirname "$python")/.." && pwd)" "$link"
        # In an existing environment asv saves nothing unless it is told which commit it measured.
        asv run --environment "existing:$link/bin/python" --set-commit-hash "$(git rev-parse HEAD)" "$@"
        ;;
    range)
        [ $# -ge 1 ] || { echo "usage: $0 range A..B [asv options]" >&2; exit 2; }
        asv run "$@"
        ;;
    gate)
        [ $# -ge 1 ] || { echo "usage: $0 gate BASE [HEAD] [asv options]" >&2; exit 2; }
        base=$1
        shift
        head=HEAD
        if [ $# -ge 1 ] && [[ $1 != -* ]]; then head=$1; shift; fi
        # asv continuous exits 1 both for a regression and for a failure to build or run: tell
        # them apart by its verdict line, so that a broken build never reads as "slower".
        log=$(mktemp)
        status=0
        asv continuous --factor "${FACTOR:-1.5}" --interleave-rounds --split "$@" "$base" "$head" 2>&1 \
            | tee "$log" || status=$?
        if grep -q "PERFORMANCE DECREASED" "$log"; then
            echo "asv.sh gate: $head is slower than $base beyond a factor of ${FACTOR:-1.5} (the rows marked +)" >&2
            exit 1
        elif [ "$status" -ne 0 ]; then
            echo "asv.sh gate: asv could not compare $base and $head (exit $status); see its output above" >&2
            exit 2
        fi
        ;;
    quick)
        # The smallest point of every implementation and benchmark, once each.
        asv run --python=same --quick --show-stderr -b "\(.*, 256, 'b1-h8-d64', 'forward'\)" "$@"
        ;;
    publish)
        asv publish "$@"
        echo "site: .asv/html/index.html (serve it with: $python -m asv preview)"
        ;;
    *)
        sed -n '2,16p' "$0" >&2
        exit 2
        ;;
esac
