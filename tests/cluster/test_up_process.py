"""`splitserve up` as a user runs it: from a clean state, served, inspected, stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import openai

from engine.presets import PRESETS
from tests.procfs import alive, cmdlines, descendants

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONTEXT = PRESETS["demo"].max_context
UP_LINE = re.compile(r"OpenAI API (http://\S+)/v1")


def test_up_serves_reports_status_and_stops_cleanly(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("RAY_AUTH_MODE", None)  # as a newcomer's shell has it: `up` must choose
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--port", "0", "--grpc-port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    try:
        url = None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "splitserve up exited early:\n" + "".join(output)
            output.append(line)
            if match := UP_LINE.search(line):
                url = match.group(1)
        assert url, "splitserve up did not come up:\n" + "".join(output)
        # Ray warns at start while its auth mode is left to its default; `up` chooses token auth.
        assert "RAY_AUTH_MODE" not in "".join(output), "".join(output)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello there!"}], max_tokens=8
        )
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1

        status = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "status", "--url", url],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        rows = [line for line in status.stdout.splitlines() if re.match(r"(prefill|decode)-\w+ ", line)]
        assert sorted(row.split()[1] for row in rows) == ["decode", "prefill"], status.stdout
        assert all(" ready " in row for row in rows)
        # HOLDS: what one request may hold on each (the demo model's context, its pools being larger)
        assert [int(row.split()[-1]) for row in rows] == [DEMO_CONTEXT] * 2, status.stdout

        token = tmp_path / f"splitserve-{urllib.parse.urlparse(url).port}.admin-token"
        assert token.stat().st_mode & 0o777 == 0o600, oct(token.stat().st_mode)

        family = descendants(process.pid)
        assert family, "Ray and the workers run as children of `splitserve up`"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
        said = "".join(output) + process.stdout.read()
        assert process.returncode == 0, said
        # The controller's record reaches up's output at its --log-level (INFO): Ray's processes logged WARNING alone
        for role in ("prefill", "decode"):
            assert re.search(
                rf"\(Controller pid=\d+\).* INFO cluster\.controller: worker {role}-\w+ \({role}\) registered", said
            ), said
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in family):
            time.sleep(0.5)
        strays = [pid for pid in family if alive(pid)]
        assert not strays, f"processes left behind: {strays}"
        assert not token.exists(), "the admin token outlives its cluster"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_dead_controller_stops_up_with_its_reason_for_a_supervisor_to_restart(tmp_path):
    """The controller actor owns the workers: killed (the OOM killer, say), it takes them with it and nothing places
    new ones. `up` must not go on answering /health with no worker behind it: it stops, says why, exits 1 and leaves
    nothing behind, so that its supervisor (Kubernetes' liveness probe, systemd) starts the cluster again."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", XDG_RUNTIME_DIR=str(tmp_path))
    command = [sys.executable, "-m", "cluster.cli", "up", "--model", "demo", "--port", "0", "--grpc-port", "0"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        while not any(UP_LINE.search(line) for line in output):
            line = process.stdout.readline()
            assert line, "splitserve up exited early:\n" + "".join(output)
            output.append(line)
        family = descendants(process.pid)
        (controller,) = [pid for pid, line in cmdlines().items() if pid in family and b"ray::Controller" in line]
        os.kill(controller, signal.SIGKILL)
        rest, _ = process.communicate(timeout=240)  # Ray's own stop takes its time on a busy machine
        said = "".join(output) + rest
        assert process.returncode == 1, said
        assert "the controller died" in said and "stopped" in said, said
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in family):
            time.sleep(0.5)
        assert not [pid for pid in family if alive(pid)], "processes left behind"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_workers_slower_than_the_start_timeout_stop_up_naming_the_setting(tmp_path):
    """A model that loads slower than `up` waits (slow storage, a node still being provisioned): `up` stops with
    status 1, saying how long it waited, which setting says so and what is still starting: the same wait, set
    longer, is what lets such a cluster come up."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", XDG_RUNTIME_DIR=str(tmp_path))
    command = [sys.executable, "-m", "cluster.cli", "up", "--port", "0", "--grpc-port", "0", "--start-timeout-s", "0.2"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said, _ = process.communicate(timeout=240)
        assert process.returncode == 1, said
        assert "waited at most 0.2 s, start_timeout_s / --start-timeout-s" in said, said
        assert "workers still starting" in said and "splitserve is up" not in said, said
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_ray_address_without_address_is_refused_not_ignored(tmp_path):
    """Embedded Ray (no --address) never joins a cluster found on the machine; RAY_ADDRESS, Ray's own way to
    name one, is refused with a message rather than left unused."""
    environment = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", SPLITSERVE_CACHE=str(tmp_path))
    command = [sys.executable, "-m", "cluster.cli", "up", "--model", "demo", "--port", "0", "--grpc-port", "0"]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "RAY_ADDRESS is set (127.0.0.1:1) but --address is not" in done.stderr, done.stderr


def test_a_model_or_tls_files_that_cannot_serve_are_refused_before_ray_starts(tmp_path):
    """What `up` can check alone it checks first, in a line naming the flag: not after Ray, the controller and the
    router started (a traceback once the router read them)."""
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("x\n")
    cases = [
        (["--model", str(tmp_path / "no-such-model")], "is neither a preset"),
        (["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(not_pem)], "--tls-cert"),
        (["--tls-cert", str(not_pem), "--tls-key", str(not_pem)], "are not a PEM certificate chain"),
    ]
    for extra, named in cases:
        command = [sys.executable, "-m", "cluster.cli", "up", "--model", "demo", "--port", "0", "--grpc-port", "0"]
        done = subprocess.run([*command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and named in done.stderr, (extra, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and "router on" not in done.stdout, (done.stdout, done.stderr)
