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

from engine.config import add_prefill_chunk_argument

# Kept free of the simulator's imports: the CLI builds every parser on each invocation.
GPU_CHOICES = ("h100", "h200")
MODEL_HELP = (
    "a preset (demo, bench-125m), llama-3-8b, llama-3-70b, llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, "
    "a model directory or a config.json"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3.1-8b", help=MODEL_HELP)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hardware", default="h100", choices=[*GPU_CHOICES, "cpu"], help="cpu: the fits of --profile")
    parser.add_argument(
        "--profile", default=None, help="a `splitserve bench profile` JSON (for --hardware cpu and --validate)"
    )
    parser.add_argument("--prefill-threads", type=int, default=1, help="cpu: the profile fit prefill workers use")
    parser.add_argument("--decode-threads", type=int, default=1, help="cpu: the profile fit decode workers use")
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="cpu: each worker's KV pool")
    parser.add_argument("--tp", type=int, default=1, help="GPUs per worker (tensor parallel)")
    parser.add_argument("--compute-efficiency", type=float, default=0.6, help="GPU: achieved / peak BF16 FLOP/s")
    parser.add_argument("--bandwidth-efficiency", type=float, default=0.8, help="GPU: achieved / peak HBM bandwidth")
    parser.add_argument("--step-overhead-ms", type=float, default=2.0, help="GPU: fixed cost of one engine step")
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="prefill -> decode gigabits/s per worker (default: GPU NIC x tp; cpu: profile)",
    )
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument(
        "--local-prefill-threshold",
        type=int,
        default=128,
        help="prompts shorter than this prefill on the decode worker",
    )
    parser.add_argument(
        "--prefill-saturation",
        type=int,
        default=8,
        help="in-flight prefills per worker beyond which prompts prefill locally",
    )
    parser.add_argument(
        "--max-prefill-wait-ms",
        type=float,
        default=0.0,
        help="the router's: a prompt's expected wait on P beyond which D prefills it, if D has less queued (0: off)",
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    add_prefill_chunk_argument(parser, "every worker's: ")
    parser.add_argument(
        "--rate", type=float, default=None, help="requests/s (default 4; with --trace: rescales its arrivals)"
    )
    parser.add_argument("--num-requests", type=int, default=400)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--input-range-ratio", type=float, default=0.5)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-range-ratio", type=float, default=0.5)
    parser.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson")
    parser.add_argument("--trace", default=None, help="CSV/JSON(L) of arrival_s,input_len,output_len")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=50.0)
    parser.add_argument(
        "--gpu-budget", type=int, default=None, help="search prefill:decode splits within this many GPUs"
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
        "on H100/H200, over each transport's bandwidth (--transfer-json or --transport-gbps)",
    )
    parser.add_argument("--transfer-json", default=None, help="a `splitserve bench transfer --json` report")
    parser.add_argument("--transport-gbps", default=None, help="NAME=GBPS,... per GPU link, e.g. grpc=9,nixl=80")
    parser.add_argument("--transfer-prompt-lens", default="1024,4096,8192", help="prompt lengths of the table")
    parser.add_argument("--json", dest="json_path", default=None)


def run(args: argparse.Namespace) -> int:
    from bench.sim.app import run as run_simulation

    return run_simulation(args)
