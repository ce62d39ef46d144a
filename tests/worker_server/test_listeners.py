"""A worker listens where it was told, and nowhere else; by hand it starts only with a secret or --insecure."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from protos.cluster_auth import SECRET_ENV, SECRET_FILE_ENV
from tests.workers.harness import launch_worker, wait_ready

TCP_LISTEN = "0A"


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != TCP_LISTEN or inode not in inodes:
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            if family == socket.AF_INET:
                address = socket.inet_ntop(family, struct.pack("<I", int(hex_address, 16)))
            else:
                address = socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            found.append((address.removeprefix("::ffff:"), int(hex_port, 16)))  # v4-mapped: the v4 address
    return found


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_a_worker_started_on_loopback_listens_only_there(tmp_path, transport):
    from tests.checkpoints import write_checkpoint

    write_checkpoint(tmp_path, "LlamaForCausalLM", seed=3)
    worker = wait_ready(launch_worker("decode", str(tmp_path), transport, "--host", "127.0.0.1", "--metrics-port", "0"))
    try:
        listening = listening_addresses(worker.process.pid)
        port = int(worker.address.rsplit(":", 1)[1])
        assert ("127.0.0.1", port) in listening
        assert len(listening) >= 2  # gRPC and /metrics at least
        assert all(address == "127.0.0.1" for address, _ in listening), listening
    finally:
        worker.stop()


def test_a_worker_by_hand_refuses_to_start_without_a_secret():
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)}
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "worker", "decode"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert SECRET_ENV in result.stderr and "--insecure" in result.stderr
