"""test_nixl_integrity's NIXL Receiver in a process of its own, for tests that kill it (SIGKILL).

    python -m tests.kv_transfer.nixl_receiver_process AGENT_NAME INSTANCE_ID REQUEST_ID...

opens a landing on ``DST_BLOCKS`` for each request id, prints ``READY {"address": ...}`` and serves until killed,
or until its stdin closes (the test process is gone).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass

from kv_transfer.layout import layout_message
from protos import decode_pb2
from tests.kv_transfer.receiver_server import loopback_ticket
from tests.kv_transfer.test_nixl_integrity import DST_BLOCKS, FINGERPRINT, LAYOUT, Receiver

START_TIMEOUT_S = 60.0  # imports torch and NIXL; slow on two shared cores


@dataclass
class ReceiverProcess:
    process: subprocess.Popen
    address: str
    instance_id: str

    layout = layout_message(LAYOUT, FINGERPRINT)  # the Receiver's

    def ticket(self, request_id: str) -> decode_pb2.Ticket:
        """As ``Receiver.ticket``: the landing the process opened for ``request_id``."""
        ticket = loopback_ticket(request_id, "nixl", self.address, self.layout, DST_BLOCKS)
        ticket.instance_id = self.instance_id
        return ticket

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def start_receiver_process(name: str, instance_id: str, request_ids: list[str]) -> ReceiverProcess:
    command = [sys.executable, "-m", "tests.kv_transfer.nixl_receiver_process", name, instance_id, *request_ids]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready: list[str] = []
    came = threading.Event()

    def read() -> None:  # on to the end: a full pipe would stop the receiver
        for line in process.stdout:
            if line.startswith("READY ") and not ready:
                ready.append(json.loads(line[len("READY ") :])["address"])
                came.set()
        came.set()

    threading.Thread(target=read, daemon=True).start()
    came.wait(START_TIMEOUT_S)
    if not ready:
        process.kill()
        raise RuntimeError(f"the receiver process did not start (exit status {process.poll()})")
    return ReceiverProcess(process, ready[0], instance_id)


if __name__ == "__main__":
    agent_name, instance, *requests = sys.argv[1:]
    receiver = Receiver(name=agent_name, instance_id=instance)
    for request_id in requests:
        receiver.inbox.open(request_id, DST_BLOCKS)
    print(f"READY {json.dumps({'address': receiver.address})}", flush=True)
    sys.stdin.read()
