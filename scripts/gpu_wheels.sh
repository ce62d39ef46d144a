#!/usr/bin/env bash
# Fills WHEELS_DIR (default scripts/wheels, git-ignored) with what scripts/gpu_check.sh installs on a GPU
# machine that cannot reach PyPI, run here, where pip can:
#
#   scripts/gpu_wheels.sh [DISTRIBUTION ...]
#
# DISTRIBUTION: names from scripts/gpu-requirements.txt (their version floors are read from there); default
# what the GPU image lacked on 2026-12-04 (H200, torch 2.11.0+cu130: llguidance, grpcio 1.84 there, the grpc
# health and reflection services, NIXL) and protobuf, in case its own is older than our stubs need. Wheels
# are for GPU_PYTHON (default 3.12) and the NIXL build of CUDA major GPU_CUDA (default 13). NIXL's
# expert-parallel libraries (nixl_ep_*/*.so, ~95 MB, unused here) and UCX's perftest are cut from its wheel,
# so the folder travels within a device call's 64 MiB. --no-deps: the machine has their dependencies.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${WHEELS_DIR:-$here/wheels}"
cuda="${GPU_CUDA:-13}"
python_version="${GPU_PYTHON:-3.12}"
(( $# )) || set -- llguidance grpcio grpcio-health-checking grpcio-reflection protobuf "nixl-cu$cuda"

requirements=()
for name in "$@"; do
  line="$(sed "s/{cuda}/$cuda/g; s/#.*//" "$here/gpu-requirements.txt" | grep -E "^$name([<>=!~ ]|$)" | tr -d ' ')" ||
    { echo "$name is not in scripts/gpu-requirements.txt" >&2; exit 2; }
  requirements+=("$line")
done

mkdir -p "$out"
platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$python_version" "${platforms[@]}" -d "$out" "${requirements[@]}"

for wheel in "$out"/nixl_cu*.whl; do
  [[ -e "$wheel" ]] || continue
  unzip -l "$wheel" | grep -qE 'nixl_ep_cu[0-9]+/.*\.so|libucx_perftest' || continue
  work="$(mktemp -d)"
  (cd "$work" && unzip -q "$wheel" && rm -f nixl_ep_cu*/*.so nixl_cu*.libs/ucx/libucx_perftest*)
  record="$(ls -d "$work"/*.dist-info)/RECORD"
  grep -vE 'nixl_ep_cu[0-9]+/.*\.so|libucx_perftest' "$record" > "$record.cut" && mv "$record.cut" "$record"
  rm "$wheel" && (cd "$work" && zip -q -9 -r "$wheel" .) && rm -rf "$work"
done
du -ch "$out"/*.whl
