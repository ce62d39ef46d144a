"""The benchmark commands (`splitserve bench ...`, `splitserve simulate`). Not part of the serving
runtime: cluster.cli hands these commands here, and a base install may lack what they import."""

from __future__ import annotations

import argparse
import importlib


def _add_arguments(module: str, parser: argparse.ArgumentParser) -> None:
    importlib.import_module(module).add_arguments(parser)


def build_bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve bench", description="Benchmarks; each prints ratios against a baseline run side by side."
    )
    bench_kinds = parser.add_subparsers(dest="bench", required=True)
    engine_bench = bench_kinds.add_parser("engine", help="engine vs transformers on the same weights")
    engine_bench.add_argument("--model", default="bench-125m")
    engine_bench.add_argument("--dtype", default="bfloat16")
    engine_bench.add_argument("--batch-sizes", default="1,8,32,64")
    engine_bench.add_argument("--prompt-len", type=int, default=128)
    engine_bench.add_argument("--decode-steps", type=int, default=32)
    engine_bench.add_argument("--threads", type=int, default=None)
    engine_bench.add_argument("--prefill-batch", type=int, default=8, help="prompts in the prefill row")
    engine_bench.add_argument(
        "--repeats", type=int, default=3, help="timed runs per side and row (best reported, median in the JSON)"
    )
    engine_bench.add_argument(
        "--quick", action="store_true", help="tiny sizes and one repeat (overrides the size flags)"
    )
    engine_bench.add_argument("--json", dest="json_path", default=None, help="write the rows to this file")
    engine_bench.set_defaults(module="bench.engine_bench")
    transfer_bench = bench_kinds.add_parser(
        "transfer", help="KV bytes/s of gRPC and NIXL vs TCP and memcpy; exposed transfer time"
    )
    transfer_bench.add_argument("--sizes", default="1,16,256", help="transfer sizes in MiB")
    transfer_bench.add_argument(
        "--repeats", type=int, default=5, help="timed transfers per path and size (median reported)"
    )
    transfer_bench.add_argument("--model", default="bench-125m", help="model of the prefill/decode workers")
    transfer_bench.add_argument("--dtype", default="bfloat16")
    transfer_bench.add_argument("--prompt-lens", default="512,2048,8192", help="prompt lengths of the exposure rows")
    transfer_bench.add_argument("--exposure-repeats", type=int, default=3, help="prefills per row (median reported)")
    transfer_bench.add_argument(
        "--long-prompt-repeats", type=int, default=1, help="prefills per row for prompts >= 4096 tokens"
    )
    transfer_bench.add_argument("--worker-threads", type=int, default=1, help="torch threads of each worker process")
    transfer_bench.add_argument("--kv-cache-mb", type=int, default=512, help="KV pool of each worker process")
    transfer_bench.add_argument("--max-num-batched-tokens", type=int, default=8192)
    transfer_bench.add_argument(
        "--decode-load",
        type=int,
        default=4,
        help="long decodes kept running on each decode worker for extra exposure rows (layer push, shortest "
        "prompt): the first token's wait when the decode engine is busy; 0 skips those rows",
    )
    transfer_bench.add_argument(
        "--device",
        default="cpu",
        help="where both ends keep their pools for the bandwidth rows (cuda: VRAM; memcpy is then a device "
        "copy, raw TCP still sends from host memory); the exposure rows run on CPU only",
    )
    transfer_bench.add_argument("--skip-bandwidth", action="store_true")
    transfer_bench.add_argument("--skip-exposure", action="store_true")
    transfer_bench.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats (overrides the size flags)"
    )
    transfer_bench.add_argument("--json", dest="json_path", default=None, help="write the rows to this file")
    transfer_bench.set_defaults(module="bench.transfer_bench")
    serve_bench = bench_kinds.add_parser(
        "serve", help="load generator for any OpenAI-compatible endpoint (vLLM bench serve metrics)"
    )
    _add_arguments("bench.serve_bench", serve_bench)
    serve_bench.set_defaults(module="bench.serve_bench")
    router_bench = bench_kinds.add_parser(
        "router", help="TTFT the router adds over the decode worker; highest sustained request rate"
    )
    _add_arguments("bench.router_bench", router_bench)
    router_bench.set_defaults(module="bench.router_bench")
    compare_bench = bench_kinds.add_parser(
        "compare", help="aggregated vs disaggregated serving over a sweep of request rates; goodput"
    )
    _add_arguments("bench.compare", compare_bench)
    compare_bench.set_defaults(module="bench.compare")
    profile_bench = bench_kinds.add_parser(
        "profile", help="prefill/decode step latency of this engine here, fitted for `simulate`"
    )
    _add_arguments("bench.profile", profile_bench)
    profile_bench.set_defaults(module="bench.profile")
    chaos_bench = bench_kinds.add_parser(
        "chaos", help="soak under worker kills, stalls and disconnects: no wrong answer, no hang, no leaked block"
    )
    _add_arguments("bench.chaos", chaos_bench)
    chaos_bench.set_defaults(module="bench.chaos")
    failover_bench = bench_kinds.add_parser(
        "failover", help="time to the next token after a decode worker dies: KV from the prefill worker vs recompute"
    )
    _add_arguments("bench.failover_bench", failover_bench)
    failover_bench.set_defaults(module="bench.failover_bench")

    return parser


def build_simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve simulate",
        description="Discrete-event simulation of a prefill/decode cluster; split search; validation.",
    )
    _add_arguments("bench.simulator", parser)
    parser.set_defaults(module="bench.simulator")
    return parser


def main(command: str, argv: list[str]) -> int:
    parser = build_bench_parser() if command == "bench" else build_simulate_parser()
    args = parser.parse_args(argv)
    return importlib.import_module(args.module).run(args)
