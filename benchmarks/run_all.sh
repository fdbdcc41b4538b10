#!/usr/bin/env bash
# Run both benchmarks and keep markdown + JSON next to each other.
#
#   benchmarks/run_all.sh [OUT_DIR] [-- extra flags for both benchmarks]
#
#   benchmarks/run_all.sh                         # -> benchmarks/results/<host>-<date>/
#   benchmarks/run_all.sh /tmp/b -- --quick       # a fast sanity run
#   benchmarks/run_all.sh /tmp/b -- --threads 1   # a shared CPU machine: steadier numbers
#
# Needs `pip install -e '.[bench]'` for the peer rows (hyper-connections==0.4.11); without
# it the layer benchmark leaves them out with a note. Uses the `hyperconn` command when
# it has a `bench` subcommand, else calls hyperconn.bench.main directly (same flags).
set -euo pipefail
cd "$(dirname "$0")/.."

out="benchmarks/results/$(hostname -s 2>/dev/null || echo host)-$(date +%Y%m%d-%H%M%S)"
if [[ $# -gt 0 && "$1" != "--" ]]; then out="$1"; shift; fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
mkdir -p "$out"

bench() {
  if command -v hyperconn >/dev/null 2>&1 && hyperconn --help 2>/dev/null | grep -q '^  bench'; then
    hyperconn bench "$@"
  else
    python -c 'import sys; from hyperconn.bench import main; sys.exit(main(sys.argv[1:]))' "$@"
  fi
}

for what in layer model; do
  echo "== hyperconn bench $what $* -> $out/$what.{md,json}" >&2
  bench "$what" "$@" --out "$out/$what.json"
  # Render the markdown from the same measurement (no second run).
  python - "$out/$what.json" "$out/$what.md" <<'PY'
import json, sys
from hyperconn.bench import write_report
write_report(json.load(open(sys.argv[1])), sys.argv[2])
PY
done
echo "results in $out" >&2
