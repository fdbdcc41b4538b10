#!/usr/bin/env bash
# Run every `-gpu` claim preset on one GPU, each under its own time limit, and write a
# report per preset (see hyperconn/experiments/claim_presets.py and docs/results/).
#
#   bash benchmarks/gpu/presets.sh OUT_DIR [presets...]
#
# presets (default: all five): gain-gpu depth-gpu kv-gpu lm-gpu overhead-gpu
# LIMIT_S (default 480) bounds each preset; a preset cut short keeps its finished runs,
# and running the same command again continues it.
set -uo pipefail
out=${1:?usage: presets.sh OUT_DIR [presets...]}; shift
presets=${*:-gain-gpu depth-gpu kv-gpu lm-gpu overhead-gpu}
limit=${LIMIT_S:-480}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
for p in $presets; do
  echo "=== $p ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" $py -m hyperconn.cli compare --preset "$p" --out "$out/$p" --device cuda --quiet \
    > "$out/$p.log" 2>&1
  echo "=== $p rc=$? ($(date -u +%H:%M:%S))"
  tail -n "${TAIL:-8}" "$out/$p.log"
  [ -d "$out/$p" ] && $py -m hyperconn.cli report "$out/$p" --out "$out/$p" > /dev/null 2>&1
done
