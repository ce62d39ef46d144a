"""The benchmark commands (`splitserve bench ...`, `splitserve simulate`). Not part of the serving
runtime: cluster.cli hands these commands here, and a base install may lack what they import.

Every value is checked as argparse reads it (bench.args' types); combinations of flags by each command's
``check_args(args, given)``, before anything starts. Both refuse with one line naming the flags, exit status 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.args import (
    Given,
    Refused,
    check_json_path,
    list_of,
    non_negative_int,
    positive_int,
)
from engine.config import DTYPES


def _add_arguments(module: str, parser: argparse.ArgumentParser) -> None:
    importlib.import_module(module).add_arguments(parser)


# engine's and transfer's flags are here, not in their modules: those import torch, and every invocation builds every
# parser.
def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--batch-sizes", type=list_of(positive_int), default="1,8,32,64")
    parser.add_argument("--prompt-len", type=positive_int, default=128)
    parser.add_argument("--decode-steps", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--prefill-batch", type=positive_int, default=8, help="prompts in the prefill row")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed runs per side and row (best reported, median in the JSON)",
    )
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes and one repeat{QUICK_HELP}")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows to this file")


def _add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=list_of(positive_int), default="1,16,256", help="transfer sizes in MiB")
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed transfers per path and size (median reported)"
    )
    parser.add_argument("--model", default="bench-125m", help="model of the prefill/decode workers")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument(
        "--prompt-lens", type=list_of(positive_int), default="512,2048,8192", help="prompt lengths of the exposure rows"
    )
    parser.add_argument("--exposure-repeats", type=positive_int, default=3, help="prefills per row (median reported)")
    parser.add_argument(
        "--long-prompt-repeats", type=positive_int, default=1, help="prefills per row for prompts >= 4096 tokens"
    )
    parser.add_argument("--worker-threads", type=positive_int, default=1, help="torch threads of each worker process")
    parser.add_argument("--kv-cache-mb", type=positive_int, default=512, help="KV pool of each worker process")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=8192)
    parser.add_argument(
        "--decode-load",
        type=non_negative_int,
        default=4,
        help="long decodes kept running on each decode worker for extra exposure rows (layer push, shortest "
        "prompt): the first token's wait when the decode engine is busy; 0 skips those rows",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where both ends keep their pools for the bandwidth rows: cpu, cuda or cuda:N (cuda: VRAM; memcpy is "
        "then a device copy, raw TCP still sends from host memory); the exposure rows run on CPU only",
    )
    parser.add_argument("--skip-bandwidth", action="store_true")
    parser.add_argument("--skip-exposure", action="store_true")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes and few repeats{QUICK_HELP}")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows to this file")


QUICK_HELP = "; refused beside a size flag it sets (rather than overriding it)"


BENCHMARKS = {  # name: (module, help)
    "engine": ("bench.engine_bench", "engine vs transformers on the same weights"),
    "transfer": ("bench.transfer_bench", "KV bytes/s of gRPC and NIXL vs TCP and memcpy; exposed transfer time"),
    "serve": ("bench.serve_bench", "load generator for any OpenAI-compatible endpoint (vLLM bench serve metrics)"),
    "router": ("bench.router_bench", "TTFT the router adds over the decode worker; highest sustained request rate"),
    "compare": ("bench.compare", "aggregated vs disaggregated serving over a sweep of request rates; goodput"),
    "profile": ("bench.profile", "prefill/decode step latency of this engine here, fitted for `simulate`"),
    "chaos": (
        "bench.chaos",
        "soak under worker kills, stalls and disconnects: no wrong answer, no hang, no leaked block",
    ),
    "failover": (
        "bench.failover_bench",
        "time to the next token after a decode worker dies: KV from the prefill worker vs recompute",
    ),
}


_LOCAL_ARGUMENTS = {"engine": _add_engine_arguments, "transfer": _add_transfer_arguments}


def _bench_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="splitserve bench",
        description="Benchmarks. engine, transfer, router and compare run their baseline in the same run and print "
        "the ratio with the target it is held to (met/MISSED); failover prints one policy against the other; "
        "profile, serve and chaos measure without a baseline.",
    )
    bench_kinds = parser.add_subparsers(dest="bench", required=True)
    parsers = {}
    for name, (module, help_text) in BENCHMARKS.items():
        parsers[name] = bench_kinds.add_parser(name, help=help_text)
        if name in _LOCAL_ARGUMENTS:
            _LOCAL_ARGUMENTS[name](parsers[name])
        else:
            _add_arguments(module, parsers[name])
        parsers[name].set_defaults(module=module)
    return parser, parsers


def build_bench_parser() -> argparse.ArgumentParser:
    return _bench_parsers()[0]


def build_simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve simulate",
        description="Discrete-event simulation of a prefill/decode cluster; split search; validation.",
    )
    _add_arguments("bench.simulator", parser)
    parser.set_defaults(module="bench.simulator")
    return parser


def main(command: str, argv: list[str]) -> int:
    if command == "bench":
        parser, parsers = _bench_parsers()
        args = parser.parse_args(argv)
        parser = parsers[args.bench]
    else:
        parser = build_simulate_parser()
        args = parser.parse_args(argv)
    module = importlib.import_module(args.module)
    try:
        check_json_path(args.json_path)
        if check_args := getattr(module, "check_args", None):  # combinations of flags; values are checked by now
            check_args(args, Given(parser, args))
        return module.run(args)
    except Refused as exc:  # as argparse refuses a value, but returned, not raised
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
