#!/usr/bin/env bash
# The GPU check (issue #13) for a machine with one NVIDIA GPU, from a clean checkout, in under 8 minutes.
#
#   scripts/gpu_check.sh [--dry-run] [--only SECTION,...] [OUT_DIR]
#
# OUT_DIR (default: $OUT, else ./gpu_check_out) receives everything: versions.txt, one log and one JSON
# per section, gpu_check.json (all rows), pytest's log and junit XML, summary.txt. Every section runs,
# whatever the previous ones did, each under its own time limit; the table at the end says PASS, FAIL
# or FAIL (timed out) for each. --dry-run runs the same sections on CPU (DRAM instead of VRAM, small
# sizes): what tests/bench/test_gpu_check.py runs to prove this script works. --only reruns some.
#
# Uses the python whose CUDA build of torch is installed (PYTHON, default python3). What else the check
# needs is listed in scripts/gpu-requirements.txt; what that python lacks is installed offline from
# wheel files in WHEELS_DIR (default: scripts/wheels beside this script, absent from a checkout: bring
# it) into an overlay environment under TMPDIR (scripts/gpu_preflight.py says why), never into the
# system. A missing wheel is a FAIL line naming it. GPU_CHECK_BUDGET_S (default 465) bounds the run;
# GPU_CHECK_TIMEOUT_<SECTION> (e.g. GPU_CHECK_TIMEOUT_PARITY=60) overrides one section's limit.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
started=$SECONDS
dry_run=0
only=""
out_dir="${OUT:-}"
while (( $# )); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --only) only=",$2,"; shift ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) out_dir="$1" ;;
  esac
  shift
done
out_dir="${out_dir:-$PWD/gpu_check_out}"
mkdir -p "$out_dir" && out_dir="$(cd "$out_dir" && pwd)"
cd "$root"
WHEELS_DIR="${WHEELS_DIR:-$here/wheels}"
REQUIREMENTS="${GPU_CHECK_REQUIREMENTS:-$here/gpu-requirements.txt}"
PYTHON="${PYTHON:-python3}"
budget=${GPU_CHECK_BUDGET_S:-465}
device=cuda quick_flag=""
(( dry_run )) && device=cpu quick_flag=--quick
export PYTHON here out_dir device quick_flag REQUIREMENTS WHEELS_DIR dry_run

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# NIXL's UCX, for the in-process agents and every worker process: on one GPU, CUDA IPC between the two
# workers' pools (cuda_copy for staging, shared memory and loopback TCP for the rest), no other NIC.
export UCX_TLS="${UCX_TLS:-cuda_copy,cuda_ipc,sm,self,tcp}" UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"
# One compile cache for every section's process: the flex kernels compiled once are loaded after.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/splitserve-gpu-check-inductor}"

names=() results=() took=()
say() { printf '== %s\n' "$*"; }
wanted() { [[ -z "$only" || "$only" == *",$1,"* ]]; }

# run_section NAME LIMIT_S COMMAND...: runs COMMAND with its output on the terminal and in
# OUT_DIR/NAME.log, within LIMIT_S (or GPU_CHECK_TIMEOUT_<NAME>) and what is left of the budget.
run_section() {
  local name="$1" limit="$2" override rc begin left
  shift 2
  wanted "$name" || return 0
  override="GPU_CHECK_TIMEOUT_$(tr 'a-z-' 'A-Z_' <<<"$name")"
  limit="${!override:-$limit}"
  left=$(( budget - (SECONDS - started) ))
  if (( left < 5 )); then
    say "$name: skipped, the ${budget} s budget is spent"
    echo "FAIL: $name not run: no time left"
    names+=("$name") results+=("FAIL (no time left)") took+=(0)
    return 0
  fi
  (( limit > left )) && limit=$left
  say "$name (limit ${limit} s)"
  begin=$SECONDS
  # timeout signals its whole process group: the section's workers and helpers go with it
  timeout --kill-after=10 "$limit" bash -c "$*" > >(tee "$out_dir/$name.log") 2>&1
  rc=$?
  case $rc in
    0) results+=("PASS") ;;
    124|137) results+=("FAIL (timed out after ${limit} s)"); echo "FAIL: $name timed out after ${limit} s" ;;
    *) results+=("FAIL (exit $rc)") ;;
  esac
  names+=("$name") took+=($(( SECONDS - begin )))
}

versions() {
  command -v nvidia-smi >/dev/null && nvidia-smi -L && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PYTHON" - <<'PY'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
except Exception as error:
    sys.exit(f"FAIL: no torch in this python ({error}): install a CUDA build of torch first")
cuda = torch.version.cuda
print("torch", torch.__version__, "cuda", cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("nixl-cu12", "nixl-cu13", "transformers", "grpcio", "protobuf", "triton"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
if torch.__version__.split("+")[0] != "2.13.0":
    print(f"note: pyproject pins torch 2.13.0; this check runs with {torch.__version__}")
failed = False
if torch.cuda.is_available():
    import ctypes
    major = cuda.split(".")[0]
    print(f"NIXL build for this torch: nixl-cu{major} (kv_transfer.nixl_agent imports nixl_cu{major})")
    try:
        ctypes.CDLL(f"libcudart.so.{major}")
        print(f"libcudart.so.{major} loads (the UCX of nixl-cu{major} hooks CUDA memory through it)")
    except OSError as error:
        failed = True
        print(f"FAIL: libcudart.so.{major} does not load ({error}): the UCX of nixl-cu{major} cannot hook CUDA memory")
sys.exit(1 if failed else 0)
PY
}

cuda_present() {
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && return 0
  echo "FAIL: torch sees no CUDA device (--dry-run runs the check on CPU)"
  return 1
}

install_deps() {
  local overlay reply
  rm -f "$out_dir/.python"
  overlay="$(mktemp -d "${TMPDIR:-/tmp}/splitserve-gpu-check-env.XXXXXX")"
  reply="$("$PYTHON" "$here/gpu_preflight.py" install "$REQUIREMENTS" "$WHEELS_DIR" "$overlay")"
  local rc=$?
  rmdir "$overlay" 2>/dev/null  # empty: nothing needed installing
  printf '%s\n' "$reply"
  local python_line
  python_line="$(grep '^PYTHON ' <<<"$reply" | tail -1)"
  [[ -n "$python_line" ]] && echo "${python_line#PYTHON }" > "$out_dir/.python"
  return $rc
}

imports() {
  "$PYTHON" "$here/gpu_preflight.py" imports "$REQUIREMENTS" protos.common_pb2 protos.decode_pb2_grpc \
    protos.prefill_pb2_grpc worker_server.base kv_transfer.nixl_agent engine.engine cluster.cli bench.gpu_check
}

bench() {
  "$PYTHON" -m bench.gpu_check "$1" --device "$device" $quick_flag --json "$out_dir/$1.json" --log-dir "$out_dir/logs"
}

gpu_tests() {
  local collect=()
  (( dry_run )) && collect=(--collect-only -q)
  "$PYTHON" -m pytest -p no:cacheprovider -m "gpu and not parity" --timeout 90 -rA --durations=0 \
    --junitxml "$out_dir/pytest-junit.xml" "${collect[@]}" tests/gpu
}

export -f say versions cuda_present install_deps imports bench gpu_tests

run_section versions 30 versions
(( dry_run )) || run_section cuda 30 cuda_present
run_section deps 90 install_deps
# the overlay environment the deps section made (or an earlier run's, for --only reruns)
[[ -s "$out_dir/.python" && -x "$(cat "$out_dir/.python")" ]] && PYTHON="$(cat "$out_dir/.python")" &&
  say "python from now on: $PYTHON"
run_section imports 60 imports
run_section flex-probe 90 bench flex-probe
flex_failed=0
if wanted flex-probe; then
  [[ "${results[-1]}" != PASS ]] && flex_failed=1
elif [[ -f "$out_dir/flex-probe.json" ]] && ! grep -q '"ok": true' "$out_dir/flex-probe.json"; then
  flex_failed=1  # a rerun with --only: the earlier run's probe decides
fi
if (( flex_failed )); then
  export SPLITSERVE_FLEX_ATTENTION=0
  echo "FAIL: compiled FlexAttention does not run here (see flex-probe.log): the sections below use the" \
    "torch attention path (their rows say attention=torch)"
fi
run_section parity 120 bench parity
run_section disaggregated 150 bench disaggregated
run_section transfer 60 bench transfer
run_section kv-bench 120 bench kv-bench
run_section decode 150 bench decode
run_section gpu-tests 150 gpu_tests

{
  say "summary ($(( SECONDS - started )) s of a ${budget} s budget; outputs in $out_dir)"
  for i in "${!names[@]}"; do printf '  %-14s %-30s %4d s\n' "${names[$i]}" "${results[$i]}" "${took[$i]}"; done
  say "numbers"
  "$PYTHON" -m bench.gpu_check summary --out "$out_dir" 2>&1 || echo "  (no numbers: $PYTHON cannot run bench.gpu_check)"
  [[ -n "${SPLITSERVE_FLEX_ATTENTION:-}" ]] && echo "  attention: torch path (SPLITSERVE_FLEX_ATTENTION=$SPLITSERVE_FLEX_ATTENTION)"
} | tee "$out_dir/summary.txt"
for result in "${results[@]}"; do [[ "$result" == PASS ]] || exit 1; done
exit 0
