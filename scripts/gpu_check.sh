#!/usr/bin/env bash
# The GPU check for a machine with one NVIDIA GPU, from a clean checkout, in under 8 minutes.
#
#   scripts/gpu_check.sh             GPU tests (tests/gpu), then bench/gpu_check.py on cuda
#   scripts/gpu_check.sh --dry-run   no GPU needed: checks the wheels, collects tests/gpu and runs
#                                    bench/gpu_check.py on cpu (what CI runs to prove this script works)
#
# Uses the python whose torch is already installed (PYTHON, default python3; a CUDA build of torch).
# Everything else the project needs is installed from wheel files, without network, from WHEELS_DIR
# (default: scripts/wheels beside this script) unless that python imports it already. Expected wheels
# (one file each, any version the project's pyproject.toml accepts):
#   nixl_cu12 transformers tokenizers safetensors huggingface_hub grpcio protobuf msgpack xxhash
#   pytest pytest_timeout jinja2 numpy   (+ their own dependencies if not installed yet)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
WHEELS_DIR="${WHEELS_DIR:-$here/wheels}"
PYTHON="${PYTHON:-python3}"
dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1
cd "$root"

# distribution:module pairs
required="nixl_cu12:nixl_cu12 transformers:transformers tokenizers:tokenizers safetensors:safetensors
huggingface_hub:huggingface_hub grpcio:grpc protobuf:google.protobuf msgpack:msgpack xxhash:xxhash
pytest:pytest pytest_timeout:pytest_timeout jinja2:jinja2 numpy:numpy"

say() { printf '== %s\n' "$*"; }

"$PYTHON" -c "import torch" 2>/dev/null || { echo "FAIL: $PYTHON has no torch; install a CUDA build of torch first" >&2; exit 2; }
if [[ $dry_run == 0 ]]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "FAIL: torch sees no CUDA device (use --dry-run on a machine without one)" >&2; exit 2; }
fi

missing=()
to_install=()
for pair in $required; do
  dist="${pair%%:*}" module="${pair##*:}"
  "$PYTHON" -c "import $module" 2>/dev/null && continue
  if compgen -G "$WHEELS_DIR/${dist}-*.whl" >/dev/null || compgen -G "$WHEELS_DIR/${dist//_/-}-*.whl" >/dev/null; then
    to_install+=("$dist")
  else
    missing+=("$dist")
  fi
done
if (( ${#missing[@]} )); then
  echo "FAIL: not importable and no wheel in WHEELS_DIR=$WHEELS_DIR: ${missing[*]}" >&2
  echo "      put ${missing[*]// /, } wheels (and their dependencies) there, or install them" >&2
  exit 2
fi
if (( ${#to_install[@]} )); then
  say "installing from $WHEELS_DIR: ${to_install[*]}"
  "$PYTHON" -m pip install --no-index --find-links "$WHEELS_DIR" "${to_install[@]}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [[ $dry_run == 1 ]]; then
  say "dry run: collecting tests/gpu"
  "$PYTHON" -m pytest -q --collect-only -p no:cacheprovider tests/gpu >/dev/null
  say "dry run: bench/gpu_check.py on cpu"
  exec "$PYTHON" -m bench.gpu_check --device cpu --quick
fi

say "GPU tests"
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
say "prefill -> decode over NIXL VRAM and gRPC, transfer bytes/s, decode tok/s"
timeout 240 "$PYTHON" -m bench.gpu_check --device cuda --json "${GPU_CHECK_JSON:-gpu_check.json}"
