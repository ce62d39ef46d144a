"""``splitserve simulate``: a discrete-event simulation of router + prefill pool + decode pool.

Given a model shape, hardware, traffic and SLOs it predicts TTFT/TPOT distributions, SLO
attainment and goodput, and (with ``--gpu-budget``) the prefill:decode split to deploy::

    splitserve simulate --model llama-3.1-8b --hardware h100 --rate 8 --ttft-slo-ms 400 --tpot-slo-ms 40 --gpu-budget 8
    splitserve simulate --hardware cpu --profile profile.json --model bench-125m ...   (fitted to this machine)
    splitserve simulate --validate compare.json --profile profile.json                  (vs measured runs)
    splitserve simulate --transfer-table --transfer-json transfer.json   (exposed KV transfer at GPU scale)

Starting point for the controller/planner: ``--json`` writes ``recommended: {prefill, decode}``.
Deploy that split (``splitserve up --prefill P --decode D``, or the pools' ``replicas`` in the
cluster config) and bound the planner around it (``--min-prefill/--max-prefill``, same for
decode); the planner then corrects from measured TTFT (prefill pool) and TPOT (decode pool).
``splits`` in the JSON gives the attainment of every other split, e.g. for the next step up.
"""

from __future__ import annotations

import argparse

from bench.args import (
    Given,
    Refused,
    fraction,
    list_of,
    named_rates,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    share,
)
from engine.config import DTYPES, add_prefill_chunk_argument

# Kept free of the simulator's imports: the CLI builds every parser on each invocation.
GPU_CHOICES = ("h100", "h200")
MODEL_HELP = (
    "a preset (demo, bench-125m), llama-3-8b, llama-3-70b, llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, "
    "a model directory or a config.json"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3.1-8b", help=MODEL_HELP)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--hardware", default="h100", choices=[*GPU_CHOICES, "cpu"], help="cpu: the fits of --profile")
    parser.add_argument(
        "--profile", default=None, help="a `splitserve bench profile` JSON (for --hardware cpu and --validate)"
    )
    parser.add_argument(
        "--prefill-threads", type=positive_int, default=1, help="cpu: the profile fit prefill workers use"
    )
    parser.add_argument(
        "--decode-threads", type=positive_int, default=1, help="cpu: the profile fit decode workers use"
    )
    parser.add_argument("--kv-cache-mb", type=positive_int, default=512, help="cpu: each worker's KV pool")
    parser.add_argument("--tp", type=positive_int, default=1, help="GPUs per worker (tensor parallel)")
    parser.add_argument("--compute-efficiency", type=fraction, default=0.6, help="GPU: achieved / peak BF16 FLOP/s")
    parser.add_argument("--bandwidth-efficiency", type=fraction, default=0.8, help="GPU: achieved / peak HBM bandwidth")
    parser.add_argument(
        "--step-overhead-ms", type=non_negative_float, default=2.0, help="GPU: fixed cost of one engine step"
    )
    parser.add_argument(
        "--link-gbps",
        type=positive_float,
        default=None,
        help="prefill -> decode gigabits/s per worker (default: GPU NIC x tp; cpu: profile)",
    )
    parser.add_argument("--prefill", type=non_negative_int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=non_negative_int, default=1, help="decode workers")
    parser.add_argument(
        "--local-prefill-threshold",
        type=non_negative_int,
        default=128,
        help="prompts shorter than this prefill on the decode worker",
    )
    parser.add_argument(
        "--prefill-saturation",
        type=non_negative_int,
        default=8,
        help="in-flight prefills per worker beyond which prompts prefill locally",
    )
    parser.add_argument(
        "--max-prefill-wait-ms",
        type=non_negative_float,
        default=0.0,
        help="the router's: a prompt's expected wait on P beyond which D prefills it, if D has less queued (0: off)",
    )
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    parser.add_argument("--max-num-seqs", type=positive_int, default=64)
    add_prefill_chunk_argument(parser, "every worker's: ")
    parser.add_argument(
        "--rate", type=positive_float, default=None, help="requests/s (default 4; with --trace: rescales its arrivals)"
    )
    parser.add_argument("--num-requests", type=positive_int, default=400)
    parser.add_argument("--input-len", type=positive_int, default=1024)
    parser.add_argument("--input-range-ratio", type=share, default=0.5)
    parser.add_argument("--output-len", type=positive_int, default=128)
    parser.add_argument("--output-range-ratio", type=share, default=0.5)
    parser.add_argument("--burstiness", type=positive_float, default=1.0, help="1 = Poisson")
    parser.add_argument("--trace", default=None, help="CSV/JSON(L) of arrival_s,input_len,output_len")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo-ms", type=positive_float, default=1000.0)
    parser.add_argument("--tpot-slo-ms", type=positive_float, default=50.0)
    parser.add_argument(
        "--gpu-budget", type=positive_int, default=None, help="search prefill:decode splits within this many GPUs"
    )
    parser.add_argument("--goodput", action="store_true", help="also search the highest rate at >= 90%% attainment")
    parser.add_argument(
        "--validate",
        default=None,
        metavar="COMPARE_JSON",
        help="simulate a `bench compare` report's runs (needs --profile)",
    )
    parser.add_argument(
        "--transfer-table",
        action="store_true",
        help="instead: exposed KV transfer share of TTFT, layer-wise vs whole-request push, for Llama-3-8B/70B "
        "on H100/H200, over each transport's bandwidth (--transfer-json or --transport-gbps); takes only the "
        "--transfer-* flags, --transport-gbps, the GPU efficiencies, --step-overhead-ms and --json",
    )
    parser.add_argument("--transfer-json", default=None, help="a `splitserve bench transfer --json` report")
    parser.add_argument(
        "--transport-gbps", type=named_rates, default=None, help="NAME=GBPS,... per GPU link, e.g. grpc=9,nixl=80"
    )
    parser.add_argument(
        "--transfer-prompt-lens",
        type=list_of(positive_int),
        default="1024,4096,8192",
        help="prompt lengths of the table",
    )
    parser.add_argument("--json", dest="json_path", default=None)


# The flags each mode reads; any other given beside it would be ignored, so it is refused.
TRANSFER_TABLE_FLAGS = (
    *("transfer_table", "transfer_json", "transport_gbps", "transfer_prompt_lens", "json_path"),
    *("compute_efficiency", "bandwidth_efficiency", "step_overhead_ms"),
)
VALIDATE_FLAGS = ("validate", "profile", "json_path")
TRANSFER_ONLY = ("transfer_json", "transport_gbps", "transfer_prompt_lens")
TRACE_SETS = ("num_requests", "input_len", "input_range_ratio", "output_len", "output_range_ratio", "burstiness")
GPU_ONLY = ("tp", "compute_efficiency", "bandwidth_efficiency", "step_overhead_ms")
CPU_ONLY = ("profile", "prefill_threads", "decode_threads", "kv_cache_mb")


def check_args(args: argparse.Namespace, given: Given) -> None:
    if args.transfer_table:
        given.refuse(sorted(given.dests - set(TRANSFER_TABLE_FLAGS)), "not read by --transfer-table")
        if bool(args.transfer_json) == bool(args.transport_gbps):
            raise Refused("--transfer-table needs one of --transfer-json FILE or --transport-gbps NAME=GBPS,...")
        return
    given.refuse(TRANSFER_ONLY, "for --transfer-table only")
    if args.validate:
        given.refuse(sorted(given.dests - set(VALIDATE_FLAGS)), "not read by --validate (it replays the report's runs)")
        if not args.profile:
            raise Refused("--validate needs --profile (the `bench profile` JSON of this machine)")
        return
    if args.trace:
        given.refuse(TRACE_SETS, "the --trace file gives the requests; not with --trace")
    if args.hardware == "cpu":
        given.refuse(GPU_ONLY, "for a GPU; --hardware cpu takes its speeds from --profile")
        if not args.profile:
            raise Refused("--hardware cpu needs --profile (from `splitserve bench profile --json`)")
    else:
        given.refuse(CPU_ONLY, f"for --hardware cpu; not with --hardware {args.hardware}")


def run(args: argparse.Namespace) -> int:
    from bench.sim.app import run as run_simulation

    return run_simulation(args)
