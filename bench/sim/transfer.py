"""Exposed KV transfer at GPU scale: how much of a lone prompt's TTFT the prefill -> decode push
adds, layer by layer vs the whole request after its prefill, over each transport's measured
bandwidth, and the link speed each push mode needs to keep that under ``EXPOSED_SHARE_LIMIT``::

    layer-wise  compute  [L0][L1][L2]...[Ln]
                link          [L0][L1][L2]...[Ln]   exposed: the push of what is left after the last layer
    whole       compute  [L0][L1][L2]...[Ln]
                link                         [L0 .. Ln]   exposed: all of it

TTFT here = prefill + exposed transfer; the prefill comes from the GPU roofline model (one step,
the whole prompt), the push arithmetic from ``Deployment.exposed_transfer_s`` (the simulator's own).
A tensor-parallel worker's ranks push their shards over their own links at once, so a worker's
link is tp x a GPU's; a transport's measured (loopback) bytes/s stands for one GPU's link and is
capped at the GPU's NIC line rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from bench.sim.cluster import Deployment, Link, WorkerSpec
from bench.sim.hardware import GPUS, resolve_model
from bench.sim.latency import GPU, ModelShape, RooflineModel, prefill_s

EXPOSED_SHARE_LIMIT = 0.05
# (model, tp on H100, tp on H200): the fewest GPUs whose HBM holds the bf16 weights with room for KV.
SHAPES = (("llama-3-8b", 1, 1), ("llama-3-70b", 4, 2))
PROMPT_LENS = (1024, 4096, 8192)  # Llama 3's context is 8192
PUSH_MODES = ("layer", "request")


@dataclass(frozen=True)
class Transport:
    name: str
    bytes_per_s: float  # one GPU's link
    source: str


def transports_from_report(path: str) -> list[Transport]:
    """Each transport's bytes/s from a ``bench transfer --json`` report: its largest transfer with
    checksums (as the system runs by default). The gRPC transport is measured as workers run it,
    its bytes on the bulk TCP links (the ``bulk`` rows); KV inside gRPC messages (``grpc`` rows)
    stands in only for a report without them."""
    with open(path) as handle:
        rows = json.load(handle)["bandwidth"]
    out = []
    for name, paths in (("grpc", ("bulk", "grpc")), ("nixl", ("nixl",))):
        for measured in paths:
            mine = [r for r in rows if r["path"] == measured and r["checksums"]]
            if mine:
                row = max(mine, key=lambda r: r["size_bytes"])
                source = f"bench transfer {measured}, {row['size_mib']:.0f} MiB with checksums"
                out.append(Transport(name, row["gb_s"] * 1e9, source))
                break
    if not out:
        raise ValueError(f"{path} has no gRPC or NIXL bandwidth row with checksums")
    return out


def transports_from_flags(rates: tuple[tuple[str, float], ...]) -> list[Transport]:
    """--transport-gbps's (name, gigabits/s per GPU link) pairs."""
    return [Transport(name, gbps * 1e9 / 8, "--transport-gbps") for name, gbps in rates]


def exposed_s(deployment: Deployment, prefill: float, tokens: int, mode: str) -> float:
    """Transfer time a lone prompt's push adds after its ``prefill`` seconds."""
    if mode == "layer":
        return deployment.exposed_transfer_s(prefill, tokens)
    if mode == "request":
        return tokens * deployment.kv_bytes_per_token / deployment.link.bytes_per_s + deployment.link.latency_s
    raise ValueError(f"unknown push mode {mode!r}")


def share(deployment: Deployment, prefill: float, tokens: int, mode: str) -> float:
    """Exposed transfer / TTFT."""
    exposed = exposed_s(deployment, prefill, tokens, mode)
    return exposed / (prefill + exposed)


def needed_bytes_per_s(deployment: Deployment, prefill: float, tokens: int, mode: str) -> float:
    """The slowest link (bytes/s) whose exposed share stays <= ``EXPOSED_SHARE_LIMIT``; the share
    falls as the link speeds up, so bisect on its logarithm."""
    low, high = 1.0, 1e15
    for _ in range(200):
        middle = (low * high) ** 0.5
        candidate = deployment_with_link(deployment, middle)
        low, high = (low, middle) if share(candidate, prefill, tokens, mode) <= EXPOSED_SHARE_LIMIT else (middle, high)
        if high / low < 1 + 1e-9:
            break
    return high


def deployment_with_link(deployment: Deployment, bytes_per_s: float) -> Deployment:
    return replace(deployment, link=Link(bytes_per_s, deployment.link.latency_s))


def table(
    transports: list[Transport],
    prompt_lens=PROMPT_LENS,
    shapes=SHAPES,
    step_overhead_s: float = RooflineModel.step_overhead_s,
    compute_efficiency: float = RooflineModel.compute_efficiency,
    bandwidth_efficiency: float = RooflineModel.bandwidth_efficiency,
) -> list[dict]:
    """A row per (model, GPU, prompt length): prefill, KV bytes, each transport's exposed share per
    push mode, and the link each push mode needs; prefill by the roofline at these efficiencies."""
    rows = []
    for model_name, *tps in shapes:
        config = resolve_model(model_name)
        shape = ModelShape.of(config, "bfloat16")
        for (gpu_name, gpu), tp in zip(GPUS.items(), tps):
            latency = RooflineModel(gpu, shape, tp, compute_efficiency, bandwidth_efficiency, step_overhead_s)
            for tokens in prompt_lens:
                rows.append(_row(model_name, gpu_name, gpu, tp, latency, shape, tokens, transports))
    return rows


def _row(model_name, gpu_name, gpu: GPU, tp, latency, shape: ModelShape, tokens, transports) -> dict:
    prefill = prefill_s(latency, tokens)
    spec = WorkerSpec(latency, 0, max(tokens, 1))
    line_rate = gpu.nic_gbps * 1e9 / 8
    links = [*transports, Transport("line rate", line_rate, f"{gpu.nic_gbps:.0f} Gb/s NIC per GPU")]
    row = {
        "model": model_name,
        "gpu": gpu_name,
        "tp": tp,
        "prompt_tokens": tokens,
        "prefill_ms": prefill * 1e3,
        "kv_mb": tokens * shape.kv_bytes_per_token / 1e6,
        "shares": {},
        "needed_gbps_per_gpu": {},
    }
    base = Deployment(1, 1, spec, spec, shape.num_layers, shape.kv_bytes_per_token, Link(line_rate * tp))
    for link in links:
        worker = deployment_with_link(base, min(link.bytes_per_s, line_rate) * tp)
        row["shares"][link.name] = {mode: share(worker, prefill, tokens, mode) for mode in PUSH_MODES}
    for mode in PUSH_MODES:
        row["needed_gbps_per_gpu"][mode] = needed_bytes_per_s(base, prefill, tokens, mode) / tp * 8 / 1e9
    return row


def markdown(rows: list[dict], transports: list[Transport]) -> str:
    names = [t.name for t in transports] + ["line rate"]
    head = (
        "| model | GPU | tp | prompt | prefill ms | KV MB | "
        + " | ".join(f"{n} layer / whole" for n in names)
        + f" | Gb/s per GPU for <{EXPOSED_SHARE_LIMIT:.0%}: layer / whole |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        shares = [f"{r['shares'][n]['layer']:.1%} / {r['shares'][n]['request']:.1%}" for n in names]
        need = r["needed_gbps_per_gpu"]
        lines.append(
            f"| {r['model']} | {r['gpu']} | {r['tp']} | {r['prompt_tokens']} | {r['prefill_ms']:.0f} | "
            f"{r['kv_mb']:.0f} | " + " | ".join(shares) + f" | {need['layer']:.1f} / {need['request']:.0f} |"
        )
    return "\n".join(lines)
