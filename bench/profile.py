"""``splitserve bench profile``: measures this engine on this machine and fits the latency models
the simulator uses (``bench.sim.latency.FittedModel``), per torch thread count::

    prefill step    = a + b*t + c*t^2 + d*t*s     a chunk of t prompt tokens after s already computed
                                                 (s = 0, t = T: a whole prompt in one step: a + bT + cT^2)
    decode step     = a + b*B + c*B*ctx           B decodes over ctx keys each

The engine runs in this process with the workers' step token budget (``--max-num-batched-tokens``),
so a prompt longer than the budget is measured as the chunks a worker computes. Mixed steps (a
chunk beside running decodes, as an aggregated worker runs them, small chunks as under
``--prefill-chunk-beside-decodes`` and full ones) are measured too and set beside what the fitted
models compose for them; the difference, fitted as ``a + b*t`` over the chunk's tokens t, is the
models' ``mixed`` term.

The cores the rest of the machine kept busy meanwhile are recorded per thread count
(``bench.sim.host``): a 2-thread step on 2 cores pays for them, and the simulator takes that toll
out of the fits before charging its own host's.

Decode rows need long contexts but not their values: their sequences are *reserved* and completed
with a token, as a decode worker adopts received KV, so no prompt is prefilled for them. KV
transfer bytes/s: ``--link-gbps``, else the gRPC transport as workers run it (its bulk TCP links,
with checksums) in a ``bench transfer`` report (``--transfer-json``, or a short run of it), read as
the transfer table reads it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bench.args import Given, Refused, list_of, positive_float, positive_int, refuse_beside_quick
from bench.sim.host import CpuMeter
from bench.sim.latency import Chunk, FittedModel, ModelShape, Step
from bench.sim.transfer import transports_from_report
from contract.sampling import SamplingParams
from engine.config import DTYPES

if TYPE_CHECKING:  # torch and the engine load when the profile runs, not when the CLI parses
    from engine.engine import Engine

FIRST_REGULAR_TOKEN = 3  # ids below are pad/bos/eos in the presets' byte vocabulary
DECODE_STEPS = 4  # timed decode steps per (batch, context), after one untimed
OUTLIER_ERROR = 0.3
MAX_OUTLIERS = 2
MIXED_ROWS = ((8, 512), (4, 1024), (2, 1536))  # (decodes, context) beside chunks of each MIXED_CHUNKS share
# Chunk sizes, as shares of the rest of the budget: capped ones (--prefill-chunk-beside-decodes) to a full one.
MIXED_CHUNKS = (1 / 16, 1 / 4, 1.0)
QUICK = dict(
    threads=(1,),
    prefill_tokens=(32, 64, 128),
    decode_batches=(1, 2),
    decode_contexts=(32, 64),
    repeats=1,
    max_num_batched_tokens=64,
)
QUICK_MIXED = ((2, 64),)


@dataclass(frozen=True)
class ProfileConfig:
    model: str
    dtype: str
    threads: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    mixed: tuple[tuple[int, int], ...]
    repeats: int
    max_num_batched_tokens: int
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProfileConfig:
        sizes = QUICK if args.quick else {name: getattr(args, name) for name in QUICK}
        return cls(
            args.model,
            args.dtype,
            sizes["threads"],
            sizes["prefill_tokens"],
            sizes["decode_batches"],
            sizes["decode_contexts"],
            QUICK_MIXED if args.quick else MIXED_ROWS,
            sizes["repeats"],
            sizes["max_num_batched_tokens"],
            args.seed,
        )


def check_args(args: argparse.Namespace, given: Given) -> None:
    refuse_beside_quick(given, QUICK)
    if args.link_gbps is not None and args.transfer_json:
        raise Refused("--link-gbps and --transfer-json both give the KV link's speed: pass one")
    config = ProfileConfig.from_args(args)
    if max(config.decode_batches) > config.max_num_batched_tokens:
        raise Refused(
            f"--decode-batches up to {max(config.decode_batches)} need --max-num-batched-tokens >= that "
            f"(it is {config.max_num_batched_tokens})"
        )


def run(args: argparse.Namespace) -> int:
    import torch

    config = ProfileConfig.from_args(args)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    link = transfer_bytes_per_s(args)
    engine = _engine(config)
    report = {
        "model": config.model,
        "dtype": config.dtype,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "machine": _machine(),
        "load_1min_before": load_before,
        "transfer": link,
        "kv_bytes_per_token": ModelShape.of(engine.model_config, config.dtype).kv_bytes_per_token,
        "fits": {},
        "points": {},
    }
    for threads in config.threads:
        torch.set_num_threads(threads)
        report["fits"][str(threads)], report["points"][str(threads)] = profile_threads(engine, config, threads)
    report["load_1min_after"] = os.getloadavg()[0]
    report["wall_seconds"] = time.perf_counter() - started
    print_report(report)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json_path}")
    return 0


def profile_threads(engine: Engine, config: ProfileConfig, threads: int) -> tuple[dict, dict]:
    """Measures and fits at the current torch thread count (``threads``)."""
    meter = CpuMeter([os.getpid()])
    before = meter.sample()
    prefill = measure_prefill(engine, config.prefill_tokens, config.repeats, threads)
    steps = [step for prompt in prefill for step in prompt["steps"]]
    decode = measure_decode(engine, config.decode_batches, config.decode_contexts, threads)
    fit = {
        "prefill": fit_latency(
            [(p["tokens"], p["tokens"] ** 2, p["tokens"] * p["start"]) for p in steps], [p["seconds"] for p in steps]
        ),
        "decode": fit_latency(
            [(p["batch"], p["batch"] * p["context"]) for p in decode], [p["seconds"] for p in decode]
        ),
    }
    model = FittedModel("fit", _coefficients(fit["prefill"], "abcd"), _coefficients(fit["decode"], "abc"))
    for prompt in prefill:
        prompt["predicted_seconds"] = sum(
            model.step_s(Step((Chunk(p["tokens"], p["start"]),))) for p in prompt["steps"]
        )
    mixed = measure_mixed(engine, config.mixed, config.max_num_batched_tokens, model, config.repeats)
    fit["mixed"] = fit_mixed(mixed)
    # What else kept cores busy meanwhile: the fits include its toll (bench.sim.host), which the
    # simulator takes out before putting its own host's other work back in.
    fit["cpu"] = meter.usage(before, meter.sample())
    return fit, {"prefill": prefill, "decode": decode, "mixed": mixed}


def _coefficients(fit: dict, names: str) -> tuple[float, ...]:
    return tuple(fit[name] for name in names)


def _engine(config: ProfileConfig) -> Engine:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.presets import resolve_model_config

    shape = ModelShape.of(resolve_model_config(config.model), config.dtype)
    batches, contexts, tokens, mixed = (
        config.decode_batches,
        config.decode_contexts,
        config.prefill_tokens,
        config.mixed,
    )
    budget = config.max_num_batched_tokens
    most_tokens = max(
        max(batches) * (max(contexts) + 2 * DECODE_STEPS), max(tokens), *(budget + b * (c + 8) for b, c in mixed)
    )
    engine_config = EngineConfig(
        model=config.model,
        dtype=config.dtype,
        num_kv_blocks=most_tokens // 16 + 64,
        max_num_batched_tokens=budget,
        max_num_seqs=max(*batches, *(b for b, _ in mixed)) + 1,
        enable_prefix_cache=False,
        seed=config.seed,
    )
    print(
        f"profile: {config.model} {config.dtype}, KV for {most_tokens} tokens "
        f"({most_tokens * shape.kv_bytes_per_token / 2**20:.0f} MiB)",
        flush=True,
    )
    return Engine(engine_config)


_ids = itertools.count()


def _prompt(tokens: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(FIRST_REGULAR_TOKEN, vocab) for _ in range(tokens)]


def measure_prefill(engine: Engine, sizes: tuple[int, ...], repeats: int, threads: int) -> list[dict]:
    """One untimed prompt, then ``repeats`` rounds over the sizes; every step of a prompt (a chunk
    of at most the budget) is timed, and the median per step kept."""
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    one_token = SamplingParams(max_tokens=1, ignore_eos=True)
    budget = engine.config.max_num_batched_tokens

    def once(tokens: int) -> list[float]:
        engine.add_request(f"prefill-{next(_ids)}", _prompt(tokens, vocab, rng), one_token)
        seconds = []
        while engine.has_unfinished():
            begin = time.perf_counter()
            engine.step()
            seconds.append(time.perf_counter() - begin)
        return seconds[: -(-tokens // budget)]  # a last step may only collect the finished output

    once(sizes[0])
    timed: dict[int, list[list[float]]] = {size: [] for size in sizes}
    for _ in range(repeats):
        for size in sizes:
            timed[size].append(once(size))
    rows = []
    for size, runs in timed.items():
        steps = [
            {"tokens": min(budget, size - start), "start": start, "seconds": statistics.median(run[i] for run in runs)}
            for i, start in enumerate(range(0, size, budget))
        ]
        rows.append({"tokens": size, "seconds": sum(step["seconds"] for step in steps), "steps": steps})
    print(
        f"  threads={threads} prefill: " + ", ".join(f"{r['tokens']}:{r['seconds'] * 1e3:.0f}ms" for r in rows),
        flush=True,
    )
    return rows


def _reserve_decodes(engine: Engine, batch: int, context: int, rng: random.Random, max_tokens: int) -> list[str]:
    """``batch`` sequences with ``context`` tokens of (unwritten) KV each, ready to decode."""
    ids = []
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for _ in range(batch):
        request_id = f"decode-{next(_ids)}"
        engine.reserve(request_id, _prompt(context, engine.model_config.vocab_size, rng), params)
        engine.complete_reservation(request_id, FIRST_REGULAR_TOKEN)
        ids.append(request_id)
    return ids


def measure_decode(engine: Engine, batches: tuple[int, ...], contexts: tuple[int, ...], threads: int) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for context in contexts:
        for batch in batches:
            ids = _reserve_decodes(engine, batch, context, rng, DECODE_STEPS + 2)
            engine.step()  # untimed
            seconds = []
            for _ in range(DECODE_STEPS):
                begin = time.perf_counter()
                engine.step()
                seconds.append(time.perf_counter() - begin)
            _finish(engine, ids)
            rows.append(
                {"batch": batch, "context": context, "seconds": statistics.median(seconds), "all_seconds": seconds}
            )
    print(
        f"  threads={threads} decode: "
        + ", ".join(f"{r['batch']}x{r['context']}:{r['seconds'] * 1e3:.0f}ms" for r in rows),
        flush=True,
    )
    return rows


def measure_mixed(engine: Engine, shapes, budget: int, model: FittedModel, repeats: int) -> list[dict]:
    """A prompt's first chunk (each ``MIXED_CHUNKS`` share of the rest of the budget) in the same step
    as running decodes, the median of ``repeats``, vs the fitted models' composition."""
    rng = random.Random(2)
    rows = []
    for batch, context in shapes:
        for tokens in sorted({max(1, round((budget - batch) * share)) for share in MIXED_CHUNKS}):
            seconds = [_one_mixed_step(engine, batch, context, tokens, rng) for _ in range(repeats)]
            measured = statistics.median(seconds)
            predicted = model.step_s(Step((Chunk(tokens),), batch, batch * (context + 1), context + 1))
            rows.append(
                {
                    "tokens": tokens,
                    "batch": batch,
                    "context": context,
                    "seconds": measured,
                    "all_seconds": seconds,
                    "predicted_seconds": predicted,
                    "error": (predicted - measured) / measured,
                }
            )
    return rows


def _one_mixed_step(engine: Engine, batch: int, context: int, tokens: int, rng: random.Random) -> float:
    ids = _reserve_decodes(engine, batch, context, rng, 4)
    engine.step()  # the decodes run once alone, as they would before the prompt arrives
    prompt_id = f"mixed-{next(_ids)}"
    engine.add_request(
        prompt_id, _prompt(tokens, engine.model_config.vocab_size, rng), SamplingParams(max_tokens=1, ignore_eos=True)
    )
    begin = time.perf_counter()
    engine.step()
    measured = time.perf_counter() - begin
    _finish(engine, ids + [prompt_id])
    return measured


def fit_mixed(rows: list[dict]) -> dict:
    """What mixed steps cost beyond the composed parts, ``a + b*t`` over the chunk's tokens, least
    squares (either sign: the parts' own fixed costs overlap in one step). One chunk size: b = 0."""
    tokens = [row["tokens"] for row in rows]
    extra = [row["seconds"] - row["predicted_seconds"] for row in rows]
    if len(set(tokens)) < 2:
        return {"a": statistics.median(extra), "b": 0.0}
    b, a = statistics.linear_regression(tokens, extra)
    residual = max(abs(e - (a + b * t)) for t, e in zip(tokens, extra))
    return {"a": a, "b": b, "max_abs_residual_s": residual}


def _drain(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


def _finish(engine: Engine, ids: list[str]) -> None:
    for request_id in ids:
        engine.abort(request_id)
    engine.step()  # collects the aborted outputs


# -- fitting -------------------------------------------------------------------------------------------


def fit_latency(features: list[tuple[float, ...]], seconds: list[float]) -> dict:
    """seconds ~ a + b*x1 + c*x2 (+ d*x3), least squares on relative error, every coefficient >= 0.

    A negative coefficient is dropped and the rest refitted (extrapolating a negative term goes
    wrong fast); a coefficient whose feature never varies comes out 0. Points off the fit by more
    than ``OUTLIER_ERROR`` are left out, worst first, at most ``MAX_OUTLIERS`` (the decode gather's
    cache cliff); they are listed under ``excluded``."""
    x = np.array([[1.0, *row] for row in features])
    y = np.array(seconds)
    kept = list(range(len(y)))
    while True:
        coefficients = _nonnegative_fit(x[kept], y[kept])
        errors = (x @ coefficients - y) / y
        worst = max(kept, key=lambda i: abs(errors[i]))
        if abs(errors[worst]) <= OUTLIER_ERROR or len(y) - len(kept) >= MAX_OUTLIERS or len(kept) <= x.shape[1] + 2:
            break
        kept.remove(worst)
    fit = {name: float(value) for name, value in zip("abcd", coefficients)}
    fit["excluded"] = [
        {"features": list(features[i]), "seconds": seconds[i], "error": float(errors[i])}
        for i in range(len(y))
        if i not in kept
    ]
    return dict(fit, mean_abs_error=float(np.abs(errors[kept]).mean()), max_abs_error=float(np.abs(errors[kept]).max()))


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    weights = 1.0 / y
    active = [column for column in range(x.shape[1]) if column == 0 or x[:, column].any()]
    while True:
        solution, *_ = np.linalg.lstsq(x[:, active] * weights[:, None], y * weights, rcond=None)
        if (solution >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(solution)))
    coefficients = np.zeros(x.shape[1])
    coefficients[active] = np.maximum(solution, 0.0)
    return coefficients


# -- KV transfer ---------------------------------------------------------------------------------------

DEFAULT_LINK_GBPS = 8.0


def transfer_bytes_per_s(args: argparse.Namespace) -> dict:
    if args.link_gbps is not None:
        return {"bytes_per_s": args.link_gbps * 1e9 / 8, "source": "--link-gbps"}
    if args.transfer_json:
        try:
            return link_from_transfer_report(args.transfer_json)
        except ValueError as exc:
            raise Refused(f"--transfer-json {exc}") from None
    if args.quick:
        return {"bytes_per_s": DEFAULT_LINK_GBPS * 1e9 / 8, "source": "assumed (--quick measures no transfer)"}
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "transfer.json")
        command = [
            sys.executable,
            "-m",
            "cluster.cli",
            "bench",
            "transfer",
            "--skip-exposure",
            "--sizes",
            "16",
            "--repeats",
            "3",
            "--json",
            path,
        ]
        print("profile: measuring KV transfer bytes/s (bench transfer, 16 MiB over gRPC) ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode == 0:
            return link_from_transfer_report(path)
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"profile: transfer measurement failed ({reason[0]}); assuming {DEFAULT_LINK_GBPS} Gb/s", file=sys.stderr)
        return {"bytes_per_s": DEFAULT_LINK_GBPS * 1e9 / 8, "source": f"assumed (measurement failed: {reason[0]})"}


def link_from_transfer_report(path: str) -> dict:
    """The gRPC transport's bytes/s as workers run it, read as the transfer table reads it
    (``bench.sim.transfer.transports_from_report``: its bulk TCP links, with checksums)."""
    try:
        grpc = next((t for t in transports_from_report(path) if t.name == "grpc"), None)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a `bench transfer --json` report ({exc})") from None
    if grpc is None:
        raise ValueError(f"{path} has no gRPC (with checksums) bandwidth row")
    return {"bytes_per_s": grpc.bytes_per_s, "source": grpc.source}


# -- report --------------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    print(f"{'=' * 20} bench profile: {report['model']} {report['dtype']} {'=' * 20}")
    print(
        f"load (1 min) before {report['load_1min_before']:.2f}, after {report['load_1min_after']:.2f}; "
        f"{report['machine']['cpu_count']} CPUs"
    )
    for threads, fit in report["fits"].items():
        points = report["points"][threads]
        p, d = fit["prefill"], fit["decode"]
        print(
            f"threads={threads}: prefill step = {p['a'] * 1e3:.2f}ms + {p['b'] * 1e6:.1f}us*t + "
            f"{p['c'] * 1e9:.3f}ns*t^2 "
            f"+ {p['d'] * 1e9:.3f}ns*t*s   {_errors(p, lambda f: f'{f[0]:.0f} tokens after {f[2] / f[0]:.0f}')}"
        )
        prompts = ", ".join(
            f"{r['tokens']}: {r['seconds'] * 1e3:.0f}/{r['predicted_seconds'] * 1e3:.0f}" for r in points["prefill"]
        )
        print(f"{'':10} whole prompts (ms, measured/fitted): {prompts}")
        print(
            f"{'':10} decode step  = {d['a'] * 1e3:.2f}ms + {d['b'] * 1e3:.2f}ms*B + "
            f"{d['c'] * 1e9:.1f}ns*B*ctx   {_errors(d, lambda f: f'{f[0]:.0f} decodes @{f[1] / f[0]:.0f}')}"
        )
        mixed = ", ".join(
            f"{r['tokens']}+{r['batch']}@{r['context']}: {r['seconds'] * 1e3:.0f}/{r['predicted_seconds'] * 1e3:.0f}ms"
            for r in points["mixed"]
        )
        print(
            f"{'':10} mixed steps (a chunk beside decodes), measured/composed: {mixed}; mixed term "
            f"{fit['mixed']['a'] * 1e3:+.1f}ms {fit['mixed'].get('b', 0.0) * 1e6:+.1f}us*t"
        )
        if fit.get("cpu"):
            print(f"{'':10} other work on the machine meanwhile: {fit['cpu']['other_cores']:.2f} cores busy")
    link = report["transfer"]
    print(
        f"KV transfer: {link['bytes_per_s'] * 8 / 1e9:.2f} Gb/s ({link['source']}); "
        f"{report['kv_bytes_per_token']} KV bytes/token"
    )


def _errors(fit: dict, describe) -> str:
    text = f"(mean |err| {fit['mean_abs_error']:.1%}, max {fit['max_abs_error']:.1%})"
    for point in fit["excluded"]:
        text += f"; left out {describe(point['features'])}: {point['seconds'] * 1e3:.0f}ms, fit {point['error']:+.0%}"
    return text


def _machine() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument(
        "--threads", type=list_of(positive_int), default="1,2", help="torch thread counts to profile (a fit for each)"
    )
    parser.add_argument("--prefill-tokens", type=list_of(positive_int), default="64,128,256,512,768,1024,1536,2048")
    # bench compare's contexts reach ~1600 and its batches ~8. Beyond ~10k keys per step the
    # decode gather falls off a cache cliff the linear fit does not model (such points are left out).
    parser.add_argument("--decode-batches", type=list_of(positive_int), default="1,2,4,8")
    parser.add_argument("--decode-contexts", type=list_of(positive_int), default="256,512,1024,1536")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed prefills per size, and mixed steps per shape (median used)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=512,
        help="the step token budget, as the workers run (bench compare's default)",
    )
    parser.add_argument(
        "--link-gbps", type=positive_float, default=None, help="KV link gigabits/s (skips the measurement)"
    )
    parser.add_argument(
        "--transfer-json",
        default=None,
        help="a `splitserve bench transfer --json` report to take the gRPC transport's bytes/s from",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, one thread count, no transfer measurement (--link-gbps or --transfer-json still give one); "
        "refused beside a size flag it sets (rather than overriding it)",
    )
    parser.add_argument("--json", dest="json_path", default=None)
