"""KV across hosts: two network namespaces joined by a veth pair, shaped with tc tbf (1 Gbit/s; this
VM's kernel has no netem, so no added delay nor random loss), a decode worker in one and a prefill
worker in the other (``ip netns exec ... splitserve worker --host ADDRESS``), and the client
(tests/kv_transfer/netns_driver.py) on the prefill host, so every byte crosses the shaped link.

- a large prompt's KV (~100 MiB) over the bulk path fills the link: >= 70% of the shaped rate;
- the link stalls (tbf at 8 kbit/s for a second: queue overflow, packets dropped) while requests
  run, then drops packets all along (a queue shorter than TCP's bursts):
  output stays token-identical to transformers and every block returns on both workers;
- the link goes down in the middle of a transfer (every packet vanishes; neither end is told), over
  the bulk path and over gRPC messages (a prefill worker with ``--no-kv-bulk``): the prefill
  worker's answer says so within the links' silence bound (cluster_auth.PEER_SILENCE_S: the bulk
  path waited out its 30 s stall timeout) and blames the link (UNAVAILABLE, naming the decode
  worker in contract.errors.UNREACHABLE_PEER, as a router reads it), and once the link is back
  every block returns and the next request is exact.

Needs root (namespaces, veth, tc); everything is torn down at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from protos.cluster_auth import PEER_SILENCE_S, ensure_secret_in_env
from tests.checkpoints import hf_greedy, write_checkpoint
from tests.workers.harness import WorkerProcess, stop_workers, wait_ready

RATE_MBIT = 1000
# Wide KV per token (12 layers x 8 KV heads x 64 dims, fp32: 48 KiB), so prompts carry megabytes.
WIDE_SHAPE = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=4096,
)
FILL_PROMPT_TOKENS = 2048  # 96 MiB of KV
FILL_TARGET = 0.70
CUT_RATE_MBIT = 40  # a 2048-token prompt's KV takes ~20 s: the link is cut well inside it
MAX_TOKENS = 6
SPLITSERVE = str(Path(sys.executable).parent / "splitserve")


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=20)


class Link:
    """Two namespaces, one veth pair between them, tbf on both ends."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.namespaces = {"prefill": f"ssp-{tag}", "decode": f"ssd-{tag}"}
        self.devices = {"prefill": f"svp-{tag}", "decode": f"svd-{tag}"}
        subnet = f"10.{random.randrange(100, 250)}.{random.randrange(0, 250)}"
        self.addresses = {"prefill": f"{subnet}.1", "decode": f"{subnet}.2"}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for namespace in self.namespaces.values():
            _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", self.devices["prefill"], "type", "veth", "peer", "name", self.devices["decode"])
        for side, namespace in self.namespaces.items():
            device = self.devices[side]
            _run("ip", "link", "set", device, "netns", namespace)
            self.exec(side, "ip", "addr", "add", f"{self.addresses[side]}/24", "dev", device)
            self.exec(side, "ip", "link", "set", device, "up")
            self.exec(side, "ip", "link", "set", "lo", "up")
        self.shape()

    def exec(self, side: str, *command: str) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.namespaces[side], *command)

    def shape(self, mode: str = "rate", rate_mbit: int = RATE_MBIT) -> None:
        """tbf on each end's egress (this kernel has no netem: no delay, no random loss):
        ``rate``: ``rate_mbit``; ``stall``: ~nothing gets through (the queue overflows, packets drop);
        ``drops``: RATE_MBIT with a queue too short for TCP's bursts (tail drops all along)."""
        settings = {
            "rate": [f"{rate_mbit}mbit", "burst", "256kb", "latency", "50ms"],
            "stall": ["8kbit", "burst", "1600", "limit", "3000"],
            "drops": [f"{RATE_MBIT}mbit", "burst", "32kb", "limit", "40kb"],
        }[mode]
        for side in self.namespaces:
            self.exec(side, "tc", "qdisc", "replace", "dev", self.devices[side], "root", "tbf", "rate", *settings)

    def set_up(self, up: bool) -> None:
        """The decode end of the pair down (the prefill end sends into a link with no carrier: every packet
        vanishes, and neither end's connections are told) or up again."""
        self.exec("decode", "ip", "link", "set", self.devices["decode"], "up" if up else "down")

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[side]]

    def close(self) -> None:
        for namespace in self.namespaces.values():
            _run("ip", "netns", "del", namespace, check=False)  # takes its end of the veth pair along


def _launch(link: Link, role: str, checkpoint: Path, *extra: str) -> WorkerProcess:
    command = [
        *link.prefix(role), SPLITSERVE, "worker", role, "--model", str(checkpoint), "--transport", "grpc",
        "--host", link.addresses[role], "--port", "0", "--threads", "1", "--kv-cache-mb", "160", *extra,
        "--lease-ms", "120000",
    ]  # fmt: skip
    if role == "prefill":
        command = command[:-2]  # leases are the decode worker's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return WorkerProcess(role, "", process)


@dataclass
class Hosts:
    link: Link
    prefill: WorkerProcess  # pushes KV over the bulk path
    decode: WorkerProcess
    model: object  # the transformers model of the workers' checkpoint
    grpc_prefill: WorkerProcess  # --no-kv-bulk: pushes KV in gRPC messages


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Hosts:
    ensure_secret_in_env()
    checkpoint_dir = tmp_path_factory.mktemp("wide") / "wide"
    model = write_checkpoint(checkpoint_dir, "LlamaForCausalLM", seed=21, **WIDE_SHAPE)
    link = Link()
    workers: list[WorkerProcess] = []
    try:
        workers = [
            _launch(link, "prefill", checkpoint_dir),
            _launch(link, "decode", checkpoint_dir),
            _launch(link, "prefill", checkpoint_dir, "--no-kv-bulk"),
        ]
        for worker in workers:
            wait_ready(worker)
        yield Hosts(link, workers[0], workers[1], model, workers[2])
    finally:
        stop_workers(workers)
        link.close()


def _driver(link: Link, *args: str, timeout: float = 300) -> dict:
    command = [*link.prefix("prefill"), sys.executable, "-m", "tests.kv_transfer.netns_driver", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[2])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (
        f"driver failed ({done.returncode}): {done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def test_bulk_kv_fills_a_shaped_link(hosts):
    link, decode = hosts.link, hosts.decode
    _driver(link, "fill", decode.address, "256")  # warm-up: first-request costs, links opened
    result = _driver(link, "fill", decode.address, str(FILL_PROMPT_TOKENS))
    achieved_mbit = result["bytes"] * 8 / result["seconds"] / 1e6
    print(f"bulk KV over a {RATE_MBIT} Mbit/s link: {result['bytes'] / 2**20:.0f} MiB in "
          f"{result['seconds']:.3f} s = {achieved_mbit:.0f} Mbit/s ({achieved_mbit / RATE_MBIT:.0%})")  # fmt: skip
    assert result["bytes"] >= 90 * 2**20
    assert achieved_mbit >= FILL_TARGET * RATE_MBIT
    assert result["idle_blocks_used"] == 0


def _requests_during(link: Link, prefill, decode, prompts: list[list[int]], fault=None) -> dict:
    """Runs the prompts one after another on the far side while ``fault`` (a thread body) runs here."""
    spec = json.dumps({"prompts": prompts, "max_tokens": MAX_TOKENS})
    thread = threading.Thread(target=fault, daemon=True) if fault else None
    if thread:
        thread.start()
    try:
        return _driver(link, "requests", prefill.address, decode.address, spec)
    finally:
        if thread:
            thread.join(30)


def test_output_stays_exact_through_a_stall_and_packet_loss(hosts):
    link, prefill, decode, model = hosts.link, hosts.prefill, hosts.decode, hosts.model
    rng = random.Random(7)
    stalled_prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (700, 900, 640, 800)]
    lossy_prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (500, 300)]

    def stall() -> None:
        time.sleep(1.5)  # the driver has started, its first request is under way
        link.shape("stall")
        time.sleep(1.0)
        link.shape()

    try:
        stalled = _requests_during(link, prefill, decode, stalled_prompts, stall)
        link.shape("drops")
        lossy = _requests_during(link, prefill, decode, lossy_prompts)
    finally:
        link.shape()
    for prompt, result in zip(stalled_prompts + lossy_prompts, stalled["results"] + lossy["results"]):
        assert result["tokens"] == hf_greedy(model, prompt, MAX_TOKENS), f"{len(prompt)}-token prompt differs"
        assert result["kv_bytes"] > 0
    print("stall:", [round(r["seconds"], 2) for r in stalled["results"]], "drops:",
          [round(r["seconds"], 2) for r in lossy["results"]])  # fmt: skip


@pytest.mark.parametrize("path", ["bulk", "grpc"])
def test_a_link_that_goes_down_mid_transfer_is_noticed_within_the_silence_bound(hosts, path):
    link, decode, model = hosts.link, hosts.decode, hosts.model
    prefill = hosts.prefill if path == "bulk" else hosts.grpc_prefill
    command = [*link.prefix("prefill"), sys.executable, "-m", "tests.kv_transfer.netns_driver", "cut"]
    command += [prefill.address, decode.address, str(FILL_PROMPT_TOKENS)]
    link.shape("rate", CUT_RATE_MBIT)
    driver = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    lines: list[str] = []

    def until(word: str) -> None:
        for line in driver.stdout:
            lines.append(line)
            if line.startswith(word):
                return
        raise AssertionError(f"the driver ended before {word}: {''.join(lines)[-3000:]}")

    timer = threading.Timer(120, driver.kill)  # bounded, whatever the driver waits for
    timer.start()
    try:
        until("CUT")
        link.set_up(False)
        driver.stdin.write("down\n")
        driver.stdin.flush()
        until("FAILED")
        link.set_up(True)
        link.shape()
        driver.stdin.write("up\n")
        driver.stdin.flush()
        until("RESULT")
        assert driver.wait(60) == 0, "".join(lines)[-3000:]
    finally:
        timer.cancel()
        driver.kill()
        link.set_up(True)
        link.shape()
    result = json.loads(lines[-1][len("RESULT ") :])
    print(f"the prefill worker answered {result['seconds']:.1f} s after the link went down: {result['error']}")
    assert result["error"] is not None and result["error"].startswith("UNAVAILABLE: "), result["error"]
    # Over bulk, the link's end or the commit travelling beside the frames (on the same dead route) may say so first.
    said = ["lost the connection to the decode worker"] + (["bulk KV link to"] if path == "bulk" else [])
    assert any(words in result["error"] for words in said), result["error"]
    assert result["unreachable"] == result["ticket_address"] == decode.address
    assert result["seconds"] < PEER_SILENCE_S + 6, f"the lost link was noticed only after {result['seconds']:.1f} s"
    assert result["prefill_blocks_used"] == 0 and result["decode_blocks_used"] == 0

    rng = random.Random(f"after the cut, {path}")  # a prompt of its own: the decode worker has no block of it cached
    prompt = [rng.randrange(3, 320) for _ in range(400)]
    (after,) = _requests_during(link, prefill, decode, [prompt])["results"]
    assert after["tokens"] == hf_greedy(model, prompt, MAX_TOKENS), "the request after the link came back differs"
    assert after["kv_bytes"] > 0
