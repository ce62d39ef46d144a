"""What `splitserve bench ...` and `splitserve simulate` refuse, before anything starts: a bad value or a flag the
chosen mode would ignore is one line naming the flag, exit status 2, never a traceback; a report never holds a
secret; and `simulate --transfer-table` honours the GPU efficiencies it is given. No test here starts a process
beyond the CLI itself."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench.serve_bench import RequestRecord
from cluster.cli import main

ROOT = Path(__file__).resolve().parents[2]

# (command line, a flag the one-line error must name)
REFUSED = [
    # values, refused as argparse reads them
    ("bench failover --repeats 0", "--repeats"),
    ("bench failover --dtype int8", "--dtype"),
    ("bench compare --output-range abc", "--output-range"),
    ("bench compare --output-range 9,1", "--output-range"),
    ("bench compare --input-len abc", "--input-len"),
    ("bench compare --rates x,y", "--rates"),
    ("bench compare --rates=-1,0", "--rates"),
    ("bench compare --burstiness 0", "--burstiness"),
    ("bench serve --model m --goodput foo", "--goodput"),
    ("bench serve --model m --goodput ttft:abc", "--goodput"),
    ("bench serve --model m --goodput ttft:-5", "--goodput"),
    ("bench serve --burstiness 0", "--burstiness"),
    ("bench transfer --sizes 0 --skip-exposure", "--sizes"),
    ("bench transfer --sizes 1 --skip-exposure --repeats 0", "--repeats"),
    ("bench transfer --sizes 1.5 --skip-exposure", "--sizes"),
    ("bench transfer --dtype int8", "--dtype"),
    ("bench engine --dtype int8 --quick", "--dtype"),
    ("bench engine --batch-sizes 0", "--batch-sizes"),
    ("bench router --samples 0", "--samples"),
    ("bench router --rates abc", "--rates"),
    ("bench profile --link-gbps=-8", "--link-gbps"),
    ("bench chaos --faults foo", "kill-prefill"),  # the list of faults it takes, not argparse's generic message
    ("simulate --rate -1", "--rate"),
    ("simulate --num-requests 0", "--num-requests"),
    ("simulate --burstiness 0", "--burstiness"),
    ("simulate --compute-efficiency 0", "--compute-efficiency"),
    ("simulate --compute-efficiency 5", "--compute-efficiency"),
    ("simulate --link-gbps -1", "--link-gbps"),
    ("simulate --step-overhead-ms -5", "--step-overhead-ms"),
    ("simulate --ttft-slo-ms -5", "--ttft-slo-ms"),
    ("simulate --gpu-budget 0", "--gpu-budget"),
    ("simulate --tp 0", "--tp"),
    ("simulate --input-range-ratio 2", "--input-range-ratio"),
    ("simulate --transfer-table --transport-gbps grpc=-9", "--transport-gbps"),
    # --json, checked before the run
    ("simulate --num-requests 20 --json /nonexistent/dir/x.json", "--json"),
    ("bench transfer --skip-exposure --json /nonexistent/x.json", "--json"),
    ("bench compare --json /nonexistent/x.json", "--json"),
    # combinations: a flag the chosen mode would ignore, or that cannot work beside another
    ("bench compare --quick --rates 5,6 --kv-cache-mb 999", "--rates, --kv-cache-mb"),
    ("bench profile --quick --threads 4", "--threads"),
    ("bench engine --quick --batch-sizes 64", "--batch-sizes"),
    ("bench transfer --quick --sizes 64", "--sizes"),
    ("bench transfer --skip-exposure --skip-bandwidth", "--skip-bandwidth"),
    ("bench transfer --device meta --skip-exposure", "--device"),
    ("bench profile --link-gbps 8 --transfer-json /nonexistent.json", "--transfer-json"),
    ("bench profile --quick --transfer-json /nonexistent.json", "--transfer-json"),
    ("bench chaos --url http://127.0.0.1:1 --kv-cache-mb 999 --log /tmp/x.log", "--kv-cache-mb, --log"),
    ("bench failover --kill-after 64 --max-tokens 64", "--kill-after"),
    ("bench serve --dataset random --dataset-path x.json", "--dataset-path"),
    ("bench serve --dataset sharegpt --dataset-path x.json --input-len 9", "--input-len"),
    ("bench serve --model m --dataset sharegpt --dataset-path /nonexistent.json", "--dataset-path"),
    ("bench serve --base-url http://127.0.0.1:1 --port 9", "--port"),
    ("bench serve --api-key k", "--api-key-file"),
    ("simulate --trace t.csv --num-requests 5", "--num-requests"),
    ("simulate --transfer-table --transport-gbps grpc=9 --model demo --rate 99", "--model, --rate"),
    ("simulate --transfer-prompt-lens 1024", "--transfer-prompt-lens"),
    ("simulate --validate c.json --profile p.json --model demo", "--model"),
    ("simulate --hardware cpu --profile p.json --tp 2", "--tp"),
    ("simulate --kv-cache-mb 10", "--kv-cache-mb"),
]


def _refusal(capsys, command: str) -> tuple[int, str]:
    """Exit status and stderr of `splitserve COMMAND` run in this process (argparse raises SystemExit; a refused
    combination is returned)."""
    try:
        code = main(command.split())
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command, flag", REFUSED, ids=[command for command, _ in REFUSED])
def test_refused_before_anything_starts_naming_the_flag(capsys, command, flag):
    code, err = _refusal(capsys, command)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert flag in last and last.startswith(f"splitserve {command.split()[0]}"), err


def _splitserve(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "command",
    [
        "bench failover --repeats 0",  # a value
        "bench transfer --skip-exposure --skip-bandwidth",  # a combination
        "simulate --num-requests 20 --json /nonexistent/dir/x.json",  # an unwritable report
    ],
)
def test_the_real_entry_point_refuses_in_one_line_without_a_traceback(command):
    done = _splitserve(*command.split())
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"splitserve {command.split()[0]}")


def test_api_key_is_refused_with_the_message_status_gives(capsys):
    bench_code, bench = _refusal(capsys, "bench serve --api-key k")
    status_code, status = _refusal(capsys, "status --api-key k")
    assert bench_code == status_code == 2
    assert bench.splitlines()[-1].split(": ", 2)[2] == status.splitlines()[-1].split(": ", 2)[2]


def test_a_refused_run_leaves_no_json_file_behind(capsys, tmp_path):
    path = tmp_path / "report.json"
    code, _ = _refusal(capsys, f"bench failover --kill-after 9 --max-tokens 9 --json {path}")
    assert code == 2 and not path.exists()


# -- reports hold no secret ------------------------------------------------------------------------------------


def test_bench_serve_report_holds_no_api_key(tmp_path, monkeypatch):
    """The key comes from $SPLITSERVE_API_KEYS and is sent, but the report's config does not carry it."""
    monkeypatch.setenv("SPLITSERVE_API_KEYS", "KEY-FROM-ENV-42")
    sent = []

    async def send_one(target, model, request, api_key):
        sent.append(api_key)
        return RequestRecord(request.prompt_len, request.output_len, success=True, ttft=0.01, latency=0.02)

    async def run_load(base_url, model, requests, *args, endpoint):
        sent.append(args[-1])
        return [RequestRecord(r.prompt_len, r.output_len, True, 200, "", 0.01, 0.02) for r in requests], 1.0

    monkeypatch.setattr("bench.serve_bench.send_one", send_one)
    monkeypatch.setattr("bench.serve_bench.run_load", run_load)
    path = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model", "m", "--num-prompts", "2", "--json", str(path)]) == 0
    assert sent == ["KEY-FROM-ENV-42"] * 2
    assert "KEY-FROM-ENV-42" not in path.read_text()
    assert json.loads(path.read_text())["config"]["model"] == "m"


def test_bench_chaos_report_holds_no_api_key_or_admin_token(tmp_path, monkeypatch):
    """chaos reads both secrets at its start; the report it writes names neither."""
    from bench import chaos

    key_file = tmp_path / "key"
    key_file.write_text("KEY-FROM-FILE-42\n")
    monkeypatch.setenv("SPLITSERVE_ADMIN_TOKEN", "ADMIN-TOKEN-99")
    seen = {}

    async def soak(args, base_url):
        seen.update(api_key=args.api_key, admin_token=args.admin_token)
        chaos._write_json(args, types.SimpleNamespace(faults=[], records=[]), {})
        return 0

    monkeypatch.setattr(chaos, "chaos", soak)
    path = tmp_path / "chaos.json"
    argv = ["bench", "chaos", "--url", "http://127.0.0.1:1", "--api-key-file", str(key_file), "--json", str(path)]
    assert main(argv) == 0
    assert seen == {"api_key": "KEY-FROM-FILE-42", "admin_token": "ADMIN-TOKEN-99"}
    text = path.read_text()
    assert "KEY-FROM-FILE-42" not in text and "ADMIN-TOKEN-99" not in text
    assert json.loads(text)["config"]["api_key_file"] == str(key_file)  # where the key came from is no secret


# -- simulate --transfer-table honours the efficiencies ------------------------------------------------------


def _table(capsys, *flags: str) -> str:
    argv = ["simulate", "--transfer-table", "--transport-gbps", "grpc=9", "--transfer-prompt-lens", "1024", *flags]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_transfer_table_uses_the_efficiencies_given(capsys):
    default = _table(capsys)
    slow = _table(capsys, "--compute-efficiency", "0.1", "--bandwidth-efficiency", "0.1")
    assert "60% of peak FLOP/s, 80% of peak HBM bytes/s" in default
    assert "10% of peak FLOP/s, 10% of peak HBM bytes/s" in slow
    table = [line for line in default.splitlines() if line.startswith("| llama")]
    slow_table = [line for line in slow.splitlines() if line.startswith("| llama")]
    assert table and len(table) == len(slow_table) and table != slow_table
    prefill_ms = [float(line.split("|")[5]) for line in table]  # a 6x slower GPU prefills slower
    slow_prefill_ms = [float(line.split("|")[5]) for line in slow_table]
    assert all(slow > fast for slow, fast in zip(slow_prefill_ms, prefill_ms))
