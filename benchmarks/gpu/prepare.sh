#!/usr/bin/env bash
# Before a GPU session, on a machine with network: download the pure-Python wheels that
# `hyperconn bench` (rich), the peer benchmark (hyper-connections 0.4.11) and the tests (pytest) need into
# .gpu-wheels/ (ignored by git; carry it to the device, which has no network; session.sh's
# env step installs them with --no-index). About 3 MB.
#
#   bash benchmarks/gpu/prepare.sh [DIR]
#
# torch and Triton are not downloaded: the device image has its own CUDA build.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$here/.gpu-wheels}
mkdir -p "$dir"
py=${PYTHON:-python3}
# --no-deps: each package named, so nothing pulls in a CPU torch.
$py -m pip download -q --no-deps --only-binary=:all: -d "$dir" \
  rich markdown-it-py mdurl pygments hyper-connections==0.4.11 torch-einops-utils einops \
  pytest iniconfig pluggy packaging
du -sh "$dir"
ls "$dir"
