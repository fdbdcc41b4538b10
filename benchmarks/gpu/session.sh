#!/usr/bin/env bash
# One GPU session's checks and measurements, in one command (see docs/benchmarks.md).
#
#   bash benchmarks/gpu/prepare.sh                 # here, with network: wheels → .gpu-wheels/
#   bash benchmarks/gpu/session.sh OUT_DIR [steps...]   # there (carry .gpu-wheels)
#
# steps (default: all, in this order, most important first; limits in seconds sum to
# 7.5 min, inside the 8 min a GPU session's script may take, and a step that hits its limit
# loses only itself; each profile config is saved as it finishes; tests/test_gpu_script.py
# checks the sum and dry-runs every profile config on the CPU):
#   env        GPU, versions; installs .gpu-wheels/ (if present) without network     30
#   tests      CUDA kernel tests: every Triton kernel and layer against the torch path 110
#   kernels    kernel GB/s against a device copy                                       30
#   profile    GPU-busy vs wall per step at d = 768, eager: hc, mhc, isohc, hybrid; mhc
#              and isohc also without their fused coefficient kernels (<= 30 % target) 60
#   wide       the same at d = 2048 (<= 12 %)                                          40
#   compiled   torch.compile per block and CUDA graphs (wall within 1.2x of busy)      90
#   layer      layer vs peer mHCv2 (>= 5x), isohc vs mhc (<= 1.3x)                     35
#   model      whole-step wall time per variant                                        30
#   recompute  activation memory and step time: none / per-layer / block recompute    25
# Every step writes its log (and JSON) into OUT_DIR.
set -uo pipefail
out=${1:?usage: session.sh OUT_DIR [steps...]}; shift
steps=${*:-env tests kernels profile wide compiled layer model recompute}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the steps run from the repository root
here=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
wheels=${WHEELS:-$here/.gpu-wheels}

step() { # name limit_s cmd...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$out/$name.log"
  echo "=== $name rc=$rc"
}

prof() { # limit name args...: benchmarks/gpu/profile_step.py
  local limit=$1 name=$2; shift 2
  step "$name" "$limit" $py benchmarks/gpu/profile_step.py --steps 10 --out "$out/$name.json" "$@"
}

cd "$here"
for s in $steps; do
  case $s in
    env) step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; \
           if [ -d '$wheels' ]; then $py -m pip install -q --no-index --no-deps '$wheels'/*.whl; fi; \
           $py -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'; \
           $py -c 'import rich, pytest; print(\"bench and tests importable\")'; \
           $py -c 'import hyper_connections' || echo 'peer not importable: the layer step skips it'; \
           git log -1 --format=%H 2>/dev/null || true" ;;
    tests) step tests 110 $py -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not interpreter_suite" -rs ;;
    kernels) step kernels 30 $py benchmarks/bench_kernels.py --device cuda --dtype bf16 --tokens 65536 --dim 2048 --reps 20 ;;
    profile) prof 60 profile --configs residual:bf16 hc:bf16 mhc:bf16 mhc:bf16:nofold mhc:bf16:unfused isohc:bf16 isohc:bf16:unfused \
             hybrid:bf16 ;;
    wide) prof 40 wide --dim 2048 --heads 16 --configs residual:bf16 mhc:bf16 isohc:bf16 ;;
    compiled) prof 90 compiled --configs residual:bf16:compile mhc:bf16:compile mhc:bf16:graphs ;;
    layer) step layer 35 $py -m hyperconn.cli bench layer --device cuda --streams 4 --dims 512 --repeats 11 \
             --cases residual hc mhc isohc hybrid peer-mhcv2 --out "$out/layer.json" ;;
    model) step model 30 $py -m hyperconn.cli bench model --device cuda --variants residual mhc isohc \
             --stream-dtype bfloat16 --no-recompute --repeats 5 --no-memory --out "$out/model.json" ;;
    recompute) step recompute 25 $py benchmarks/bench_recompute.py --device cuda --dim 768 --seq 1024 --batch 8 \
             --rounds 3 --json "$out/recompute.json" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
