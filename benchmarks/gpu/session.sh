#!/usr/bin/env bash
# One GPU session's checks and measurements, in one command (see docs/benchmarks.md).
#
#   bash benchmarks/gpu/session.sh OUT_DIR [steps...]
#
# steps (default: all): env tests kernels layer model profile wide recompute
#   profile: GPU-busy vs wall per step at d = 768 (the issue's +30 % target), mhc with and
#            without the fused coefficient kernel, isohc; wide: the same at d = 2048 (<= 12 %);
#   recompute: activation memory and step time, none vs per-layer vs block recompute
# Every step writes its log (and JSON/markdown) into OUT_DIR and has its own time limit,
# so one hang does not lose the rest.
set -uo pipefail
out=${1:?usage: session.sh OUT_DIR [steps...]}; shift
steps=${*:-env tests kernels layer model profile wide recompute}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() { # name limit_s cmd...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$out/$name.log"
  echo "=== $name rc=$rc"
}

for s in $steps; do
  case $s in
    env) step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; \
           $py -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'" ;;
    tests) step tests 180 $py -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not interpreter_suite" -rs ;;
    kernels) step kernels 60 $py benchmarks/bench_kernels.py --device cuda --dtype bf16 --tokens 65536 --dim 2048 --reps 50 ;;
    layer) step layer 150 $py -m hyperconn.cli bench layer --device cuda --out "$out/layer.json" ;;
    model) step model 150 $py -m hyperconn.cli bench model --device cuda --variants residual hc mhc isohc hybrid \
             --stream-dtype bfloat16 --no-recompute --repeats 5 --out "$out/model.json" ;;
    profile) step profile 150 $py benchmarks/gpu/profile_step.py --steps 10 --out "$out/profile.json" --configs \
             residual:bf16 mhc:bf16 mhc:bf16:unfused isohc:bf16 isohc:bf16:unfused residual:bf16:compile mhc:bf16:compile \
             mhc:bf16:compile:unfused isohc:bf16:compile ;;
    wide) step wide 90 $py benchmarks/gpu/profile_step.py --steps 10 --dim 2048 --heads 16 --out "$out/wide.json" \
             --configs residual:bf16:compile mhc:bf16:compile ;;
    recompute) step recompute 90 $py benchmarks/bench_recompute.py --device cuda --dim 768 --seq 1024 --batch 8 \
             --rounds 3 --json "$out/recompute.json" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
