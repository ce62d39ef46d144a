#!/usr/bin/env bash
# A base install (`pip install .`, no extras) serves: the CLI's help, then `splitserve up` on the demo
# model and one completion through its OpenAI API. The container image installs this way (with pip; make
# test passes UV, which installs the same packages faster).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
up_pid=""
cleanup() {
    if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
        kill -INT "$up_pid"; wait "$up_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"$python" -m venv "$work/venv"
bin="$work/venv/bin"
"$root/scripts/install_torch.sh" "$bin/pip"
# UV (make test passes .venv's): the same resolution as pip, faster; without it, pip, as the image installs.
if [ -n "${UV:-}" ]; then
    "$UV" pip install --quiet --compile-bytecode --python "$bin/python" "$root"
else
    "$bin/pip" install --quiet "$root"
fi
cd "$work"  # not the checkout: the installed package must be what runs

"$bin/splitserve" --help > /dev/null
"$bin/splitserve" up --help > /dev/null
# the CPU decode-attention kernel's source ships in the package: it is compiled on first use
"$bin/python" -c "from engine.native_kernels import SOURCE; assert (SOURCE.parent / 'bf16_steps.h').is_file(), SOURCE"
# the router's event loop is uvloop's, a base dependency (router/server.py)
"$bin/python" -c "import uvloop; from router.server import new_event_loop; assert isinstance(new_event_loop(), uvloop.Loop)"
if "$bin/python" -c "import httpx" 2>/dev/null; then
    echo "base install check: httpx is installed, so this is not a base install" >&2; exit 1
fi
set +e
"$bin/splitserve" bench engine --help > bench.out 2>&1
status=$?
set -e
if [ "$status" -ne 2 ] || ! grep -q "splitserve\[bench\]" bench.out; then
    echo "base install check: 'splitserve bench' should name the [bench] extra; got exit $status:" >&2
    cat bench.out >&2; exit 1
fi

port="$("$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
grpc_port="$("$bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
RAY_TMPDIR="$work/ray" "$bin/splitserve" up --model demo --port "$port" --grpc-port "$grpc_port" > up.log 2>&1 &
up_pid=$!
"$bin/python" - "$port" <<'PY'
import json, sys, time, urllib.request, urllib.error

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 240
while True:
    try:
        with urllib.request.urlopen(base + "/ready", timeout=5) as reply:
            if reply.status == 200:
                break
    except (urllib.error.URLError, OSError):
        pass
    if time.monotonic() > deadline:
        sys.exit("base install check: the cluster did not become ready in 240 s")
    time.sleep(1)
body = json.dumps({"prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as reply:
    answer = json.load(reply)
assert answer["usage"]["completion_tokens"] == 8, answer
print("base install check: splitserve up answered a completion:", repr(answer["choices"][0]["text"]))
PY
kill -INT "$up_pid"
wait "$up_pid" || { echo "base install check: splitserve up did not stop cleanly" >&2; tail -20 up.log >&2; exit 1; }
up_pid=""
echo "base install check: passed"
