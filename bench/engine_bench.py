"""``splitserve bench engine``: the engine against transformers on the same weights and prompts.

One process holds both models: the engine on a preset (or model directory) and a
``transformers.LlamaForCausalLM`` loaded with the engine's own tensors, fused projections split back.
What is timed, per side::

    prefill     engine.generate(prompts, max_tokens=1)    vs  hf(input_ids, logits_to_keep=1)
    decode@B    |prefill step|-- steps ... --|              |prefill|-- forwards ... --|
                              ^ timed: decode_steps tokens          ^ timed (streamer stamp)

Each decode row is also set against the machine's memory roofline: the bytes one decode step must read
(every weight but the embedding table, and the batch's KV at the window's mean context) over the read
bandwidth of a large reduction (``bench.gpu_check``'s measure), as a fraction of the measured step time.

Both sides generate ``decode_steps + 1`` tokens greedily with EOS ignored, so the timed window after
the first token holds exactly ``decode_steps`` forward passes. Runs alternate engine/transformers
(first mover swapped each repeat) so machine noise hits both; each row reports the fastest run of
each side (other work on the machine only ever adds time), the JSON holds medians too.
Prompts differ between repeats (the engine's prefix cache never hits) but each repeat gives both
sides the same prompts.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from bench.args import Given, refuse_beside_quick
from bench.gpu_check import kv_bytes_per_step, read_bandwidth, weight_bytes_per_step
from contract.sampling import SamplingParams
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.model import CausalLM, Linear
from engine.native_kernels import native_kernels

DECODE_TARGET_BATCH = 32
DECODE_TARGET_RATIO = 1.5  # issue #13: decode at batch 32 >= 1.5x transformers
PREFILL_TARGET_RATIO = 0.9
FIRST_REGULAR_TOKEN = 3  # ids below are pad/bos/eos in the presets' byte vocabulary
SANITY_PROMPT_LEN = 12
SANITY_NEW_TOKENS = 8
BF16_LOOSE_TOKENS = 3
PREFILL_MIN_REPEATS = 5  # prefill runs are short: more of them cost little
MATMUL_SHAPE = (2048, 768, 2048)  # (m, k, n): roughly one prefill projection of this model size
# The reference matmul stops repeating after this long (a slow CPU's 20 repeats would be most of the run).
MATMUL_BUDGET_S = 10.0
_request_counter = itertools.count()
QUICK = dict(batch_sizes=(1, 4), prompt_len=32, decode_steps=8, prefill_batch=2, repeats=1)


def check_args(args: argparse.Namespace, given: Given) -> None:
    refuse_beside_quick(given, QUICK)


@dataclass(frozen=True)
class BenchConfig:
    model: str
    dtype: str
    batch_sizes: tuple[int, ...]
    prompt_len: int
    decode_steps: int
    prefill_batch: int
    repeats: int
    threads: int | None
    json_path: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        sizes = QUICK if args.quick else {name: getattr(args, name) for name in QUICK}
        return cls(model=args.model, dtype=args.dtype, threads=args.threads, json_path=args.json_path, **sizes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Row:
    """One line of the table: tokens per second of each side, from its fastest timed run."""

    name: str
    batch: int
    tokens: int  # tokens processed in each timed window
    engine_seconds: tuple[float, ...]
    hf_seconds: tuple[float, ...]

    @property
    def engine_tok_s(self) -> float:
        return self.tokens / min(self.engine_seconds)

    @property
    def hf_tok_s(self) -> float:
        return self.tokens / min(self.hf_seconds)

    @property
    def ratio(self) -> float:
        return self.engine_tok_s / self.hf_tok_s

    def to_json(self) -> dict:
        engine_median = self.tokens / statistics.median(self.engine_seconds)
        hf_median = self.tokens / statistics.median(self.hf_seconds)
        return dict(
            asdict(self),
            engine_tok_s=self.engine_tok_s,
            hf_tok_s=self.hf_tok_s,
            ratio=self.ratio,
            engine_median_tok_s=engine_median,
            hf_median_tok_s=hf_median,
            median_ratio=engine_median / hf_median,
        )


@dataclass(frozen=True)
class SanityResult:
    agree: bool  # fp32 greedy tokens identical
    engine_tokens: tuple[int, ...]
    hf_tokens: tuple[int, ...]
    bf16_first_tokens_agree: bool  # loose: only the first few tokens, in the benchmark dtype


# -- entry point ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Runs the whole benchmark; 0 if it completed and the sanity check agreed, else 1."""
    config = BenchConfig.from_args(args)
    if config.threads:
        torch.set_num_threads(config.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    engine = build_engine(config)
    hf = hf_model_from_engine(engine.runner.model, config.torch_dtype)
    sanity = sanity_check(engine, hf, config)
    print(_sanity_line(sanity), flush=True)
    rows = [measure_prefill(engine, hf, config)]
    rows += [measure_decode(engine, hf, config, batch) for batch in config.batch_sizes]
    flops = flops_summary(engine.model_config, config, rows[0])
    roofline = roofline_summary(engine, config, rows[1:])
    load = (load_before, os.getloadavg()[0])
    report = build_report(config, sanity, rows, flops, roofline, time.perf_counter() - started, load)
    print_report(report)
    if config.json_path:
        with open(config.json_path, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {config.json_path}")
    return 0 if sanity.agree else 1


def build_engine(config: BenchConfig) -> Engine:
    """An engine sized so every benchmark batch prefills in one step and never runs out of KV."""
    largest = max((config.prefill_batch, *config.batch_sizes))
    block_size = EngineConfig.block_size
    blocks_per_seq = -(-(config.prompt_len + config.decode_steps + 1) // block_size)
    return Engine(
        EngineConfig(
            model=config.model,
            dtype=config.dtype,
            num_kv_blocks=2 * largest * blocks_per_seq,  # twice: freed blocks linger in the prefix cache
            max_num_seqs=largest,
            max_num_batched_tokens=max(2048, largest * config.prompt_len),
            num_threads=config.threads,
        )
    )


# -- the transformers twin ------------------------------------------------------------------------


def hf_model_from_engine(model: CausalLM, dtype: torch.dtype):
    """A transformers LlamaForCausalLM (sdpa, eval) holding ``model``'s weights cast to ``dtype``."""
    import transformers

    hf_config = hf_llama_config(model.config)
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.to(dtype).eval()


def hf_llama_config(config: ModelConfig):
    import transformers

    if config.architecture != "LlamaForCausalLM":
        raise SystemExit(f"bench engine compares Llama models only; {config.architecture} is not supported")
    rope: dict = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = dict(asdict(config.rope_scaling), rope_type="llama3", rope_theta=config.rope_theta)
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids) or None,
        pad_token_id=0,
        attn_implementation="sdpa",
    )


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The engine's tensors under Hugging Face names: qkv_proj -> q|k|v, gate_up_proj -> gate|up."""
    config = model.config
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".self_attn.qkv_proj." in name:
            parts = tensor.split([config.q_size, config.kv_size, config.kv_size])
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                state[name.replace("qkv_proj", proj)] = part
        elif ".mlp.gate_up_proj." in name:
            gate, up = tensor.split([config.intermediate_size, config.intermediate_size])
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        else:
            state[name] = tensor
    return state


# -- sanity check ---------------------------------------------------------------------------------


def sanity_check(engine: Engine, hf, config: BenchConfig) -> SanityResult:
    """Greedy tokens of fp32 copies must match exactly; in the benchmark dtype only the first few."""
    prompt = make_prompts(1, SANITY_PROMPT_LEN, engine.model_config.vocab_size, seed="sanity")[0]
    fp32_engine = Engine(EngineConfig(model=config.model, dtype="float32", num_kv_blocks=8, max_num_seqs=1))
    fp32_engine.runner.model.load_state_dict(engine.runner.model.state_dict())  # the benchmark's own weights
    fp32_hf = hf_model_from_engine(fp32_engine.runner.model, torch.float32)
    ours = engine_greedy(fp32_engine, prompt, SANITY_NEW_TOKENS)
    theirs = hf_greedy(fp32_hf, prompt, SANITY_NEW_TOKENS)
    del fp32_engine, fp32_hf
    gc.collect()
    loose = engine_greedy(engine, prompt, BF16_LOOSE_TOKENS) == hf_greedy(hf, prompt, BF16_LOOSE_TOKENS)
    return SanityResult(ours == theirs, tuple(ours), tuple(theirs), loose)


def engine_greedy(engine: Engine, prompt: list[int], new_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return list(engine.generate([prompt], params)[0].token_ids)


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    out = hf.generate(**_hf_inputs([prompt]), **_hf_greedy_kwargs(new_tokens))
    return out[0, len(prompt) :].tolist()


# -- measurements ---------------------------------------------------------------------------------


def make_prompts(count: int, length: int, vocab_size: int, seed: int | str) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_REGULAR_TOKEN, vocab_size) for _ in range(length)] for _ in range(count)]


def measure_prefill(engine: Engine, hf, config: BenchConfig) -> Row:
    batch, vocab = config.prefill_batch, engine.model_config.vocab_size
    print(f"prefill: {batch} x {config.prompt_len} tokens ...", flush=True)
    engine_times, hf_times = alternate(
        lambda prompts: engine_prefill_seconds(engine, prompts),
        lambda prompts: hf_prefill_seconds(hf, prompts),
        lambda trial: make_prompts(batch, config.prompt_len, vocab, seed=f"prefill-{trial}"),
        max(config.repeats, PREFILL_MIN_REPEATS),
    )
    return Row("prefill", batch, batch * config.prompt_len, engine_times, hf_times)


def measure_decode(engine: Engine, hf, config: BenchConfig, batch: int) -> Row:
    vocab, steps = engine.model_config.vocab_size, config.decode_steps
    print(f"decode@{batch}: {batch} x ({config.prompt_len} prompt + {steps} decode) ...", flush=True)
    engine_times, hf_times = alternate(
        lambda prompts: engine_decode_seconds(engine, prompts, steps),
        lambda prompts: hf_decode_seconds(hf, prompts, steps),
        lambda trial: make_prompts(batch, config.prompt_len, vocab, seed=f"decode-{batch}-{trial}"),
        config.repeats,
    )
    return Row(f"decode@{batch}", batch, batch * steps, engine_times, hf_times)


def alternate(
    engine_run: Callable[[list[list[int]]], float],
    hf_run: Callable[[list[list[int]]], float],
    prompts_for: Callable[[int], list[list[int]]],
    repeats: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """One untimed warm-up each (trial 0), then ``repeats`` timed rounds with the first mover swapped."""
    engine_times: list[float] = []
    hf_times: list[float] = []
    for trial in range(repeats + 1):
        prompts = prompts_for(trial)
        order = [(engine_run, engine_times), (hf_run, hf_times)]
        for side, times in order if trial % 2 else reversed(order):
            seconds = side(prompts)
            if trial > 0:
                times.append(seconds)
    return tuple(engine_times), tuple(hf_times)


def engine_prefill_seconds(engine: Engine, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    begin = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - begin


@torch.inference_mode()
def hf_prefill_seconds(hf, prompts: list[list[int]]) -> float:
    inputs = _hf_inputs(prompts)
    begin = time.perf_counter()
    logits = hf(**inputs, logits_to_keep=1).logits
    logits[:, -1].argmax(-1)  # the engine samples too
    return time.perf_counter() - begin


def engine_decode_seconds(engine: Engine, prompts: list[list[int]], steps: int) -> float:
    """Seconds from the moment every prompt has its first token until all have ``steps`` more."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    tag = next(_request_counter)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"bench-{tag}-{index}", prompt, params)
    started: set[str] = set()
    begin = None
    decoded = 0
    while engine.has_unfinished():
        outputs = engine.step()
        if begin is None:
            started.update(o.request_id for o in outputs if o.token_ids)
            begin = time.perf_counter() if len(started) == len(prompts) else None
        else:
            decoded += sum(len(o.token_ids) for o in outputs)
    seconds = time.perf_counter() - begin
    if decoded != len(prompts) * steps:
        raise RuntimeError(f"engine decoded {decoded} tokens in the timed window, expected {len(prompts) * steps}")
    return seconds


class _FirstTokenClock:
    """A generate() streamer that stamps the time the first new token arrives (after prefill)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1  # put #1 is the prompt itself
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_decode_seconds(hf, prompts: list[list[int]], steps: int) -> float:
    """Same window as the engine: after the first token, ``steps`` forward passes."""
    clock = _FirstTokenClock()
    out = hf.generate(**_hf_inputs(prompts), **_hf_greedy_kwargs(steps + 1), streamer=clock)
    end = time.perf_counter()
    if out.shape[1] != len(prompts[0]) + steps + 1 or clock.first_token_at is None:
        raise RuntimeError(f"transformers generated {out.shape[1] - len(prompts[0])} tokens, expected {steps + 1}")
    return end - clock.first_token_at


def _hf_inputs(prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding anywhere
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _hf_greedy_kwargs(new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


# -- FLOP/s ---------------------------------------------------------------------------------------


def prefill_flops(model: ModelConfig, batch: int, prompt_len: int) -> float:
    """Multiply-adds x2 of one prefill: projections for every token, causal attention, lm_head once per prompt."""
    per_token = (
        2
        * model.num_layers
        * (
            model.hidden_size * (model.q_size + 2 * model.kv_size)
            + model.q_size * model.hidden_size
            + 3 * model.hidden_size * model.intermediate_size
        )
    )
    attention = 2 * 2 * model.num_layers * model.q_size * prompt_len * (prompt_len + 1) / 2  # QK^T and PV
    lm_head = 2 * model.hidden_size * model.vocab_size
    return batch * (prompt_len * per_token + attention + lm_head)


def matmul_flop_s(dtype: torch.dtype, repeats: int = 20, budget_s: float = MATMUL_BUDGET_S) -> float:
    """Best-of-N FLOP/s of one MATMUL_SHAPE product in the benchmark dtype, taken as the engine's projections
    take it (``engine.model.Linear``: on a CPU without bf16 arithmetic a plain bf16 ``a @ b`` ran at 0.2
    GFLOP/s on a Zen 1, a reference no engine should be measured against). N is ``repeats``, or fewer (at
    least one) once ``budget_s`` seconds of timed runs have gone."""
    m, k, n = MATMUL_SHAPE
    layer, x = Linear(k, n, bias=False).to(dtype), torch.randn(m, k, dtype=dtype)
    best, spent = float("inf"), 0.0
    with torch.inference_mode():
        layer(x)  # warm-up: the kernel's first call picks and packs
        for _ in range(repeats):
            begin = time.perf_counter()
            layer(x)
            seconds = time.perf_counter() - begin
            best, spent = min(best, seconds), spent + seconds
            if spent >= budget_s:
                break
    return 2 * m * k * n / best


def flops_summary(model: ModelConfig, config: BenchConfig, prefill: Row) -> dict:
    work = prefill_flops(model, prefill.batch, config.prompt_len)
    reference = matmul_flop_s(config.torch_dtype)
    engine_rate = work / min(prefill.engine_seconds)
    hf_rate = work / min(prefill.hf_seconds)
    return {
        "prefill_flop": work,
        "matmul_shape": MATMUL_SHAPE,
        "matmul_flop_s": reference,
        "engine_prefill_flop_s": engine_rate,
        "hf_prefill_flop_s": hf_rate,
        "engine_fraction_of_matmul": engine_rate / reference,
        "hf_fraction_of_matmul": hf_rate / reference,
    }


# -- memory roofline ------------------------------------------------------------------------------

ROOFLINE_READ_MIB = 1024  # large enough to leave every cache: DRAM bandwidth


def decode_bytes_per_step(engine: Engine, batch: int, config: BenchConfig) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step of the timed window reads, on average: the window's
    steps attend prompt_len + 1 ... prompt_len + decode_steps keys."""
    mean_keys = config.prompt_len + (config.decode_steps + 1) / 2
    return weight_bytes_per_step(engine.runner.model), kv_bytes_per_step(engine, batch, mean_keys)


def roofline_summary(engine: Engine, config: BenchConfig, decode_rows: list[Row]) -> dict:
    """Per decode row: the step time the memory bandwidth allows, and each side's fraction of it."""
    bandwidth = read_bandwidth("cpu", ROOFLINE_READ_MIB)
    rows = {}
    for row in decode_rows:
        weights, kv = decode_bytes_per_step(engine, row.batch, config)
        roofline_step_s = (weights + kv) / bandwidth
        engine_step_s = min(row.engine_seconds) / config.decode_steps
        hf_step_s = min(row.hf_seconds) / config.decode_steps
        rows[row.name] = {
            "weight_bytes": weights,
            "kv_bytes": kv,
            "roofline_step_s": roofline_step_s,
            "engine_step_s": engine_step_s,
            "hf_step_s": hf_step_s,
            "engine_fraction": roofline_step_s / engine_step_s,
            "hf_fraction": roofline_step_s / hf_step_s,
        }
    return {"read_bandwidth_bytes_s": bandwidth, "read_mib": ROOFLINE_READ_MIB, "rows": rows}


# -- report ---------------------------------------------------------------------------------------


def build_report(
    config: BenchConfig,
    sanity: SanityResult,
    rows: list[Row],
    flops: dict,
    roofline: dict,
    seconds: float,
    load: tuple[float, float],
) -> dict:
    import transformers

    by_name = {row.name: row for row in rows}
    targets = {"prefill": {"target_ratio": PREFILL_TARGET_RATIO, "ratio": by_name["prefill"].ratio}}
    decode_row = by_name.get(f"decode@{DECODE_TARGET_BATCH}")
    if decode_row is not None:
        targets[decode_row.name] = {"target_ratio": DECODE_TARGET_RATIO, "ratio": decode_row.ratio}
    for target in targets.values():
        target["met"] = target["ratio"] >= target["target_ratio"]
    return {
        "metadata": {
            "model": config.model,
            "dtype": config.dtype,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "cpu_kernels": _cpu_kernels(),
            "prompt_len": config.prompt_len,
            "decode_steps": config.decode_steps,
            "prefill_batch": config.prefill_batch,
            "repeats": config.repeats,
            "prefill_repeats": len(rows[0].engine_seconds),
            "wall_seconds": seconds,
            "load_average_1min": load,  # before, after: other work on the machine skews both sides
        },
        "sanity": asdict(sanity),
        "rows": [row.to_json() for row in rows],
        "flops": flops,
        "roofline": roofline,
        "targets": targets,
    }


def _cpu_kernels() -> str:
    """Which CPU kernels the engine ran (engine/native_kernels.py)."""
    kernels = native_kernels()
    if kernels is None:
        return "torch's"
    return f"native ({kernels.isa})"


def _sanity_line(sanity: SanityResult) -> str:
    verdict = "AGREE" if sanity.agree else "DISAGREE"
    loose = "agree" if sanity.bf16_first_tokens_agree else "differ"
    return (
        f"sanity: fp32 greedy tokens {verdict} (engine {list(sanity.engine_tokens)} vs transformers "
        f"{list(sanity.hf_tokens)}); benchmark-dtype first {BF16_LOOSE_TOKENS} tokens {loose}"
    )


def print_report(report: dict) -> None:
    meta, flops = report["metadata"], report["flops"]
    print(
        f"\nmodel {meta['model']} {meta['dtype']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['threads']} threads / {meta['cpu_count']} cpus, prompt {meta['prompt_len']}, "
        f"decode {meta['decode_steps']} steps, best of {meta['repeats']} (prefill: of {meta['prefill_repeats']}), "
        f"CPU kernels: {meta['cpu_kernels']}"
    )
    print(f"{'row':<12}{'engine tok/s':>14}{'hf tok/s':>14}{'ratio':>9}{'median ratio':>14}")
    for row in report["rows"]:
        print(
            f"{row['name']:<12}{row['engine_tok_s']:>14.1f}{row['hf_tok_s']:>14.1f}"
            f"{row['ratio']:>8.2f}x{row['median_ratio']:>13.2f}x"
        )
    print(
        f"prefill FLOP/s: engine {flops['engine_prefill_flop_s'] / 1e9:.1f} G, transformers "
        f"{flops['hf_prefill_flop_s'] / 1e9:.1f} G, {meta['dtype']} matmul {flops['matmul_flop_s'] / 1e9:.1f} G "
        f"-> engine at {flops['engine_fraction_of_matmul']:.0%} of matmul peak"
    )
    roofline = report["roofline"]
    for name, row in roofline["rows"].items():
        print(
            f"{name} memory roofline: {(row['weight_bytes'] + row['kv_bytes']) / 1e6:.0f} MB/step (weights "
            f"{row['weight_bytes'] / 1e6:.0f} + KV {row['kv_bytes'] / 1e6:.0f}) at "
            f"{roofline['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s read = {row['roofline_step_s'] * 1e3:.1f} ms/step; "
            f"engine {row['engine_step_s'] * 1e3:.1f} ms/step = {row['engine_fraction']:.0%} of it, "
            f"transformers {row['hf_step_s'] * 1e3:.1f} ms/step = {row['hf_fraction']:.0%}"
        )
    for name, target in report["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        print(f"target {name}: {target['ratio']:.2f}x vs >= {target['target_ratio']}x: {verdict}")
    before, after = meta["load_average_1min"]
    print(f"({meta['wall_seconds']:.0f} s; 1-min load average {before:.1f} before, {after:.1f} after)")
