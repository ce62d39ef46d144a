"""How long one engine step takes, given what it computes.

A step is what the engine's scheduler emits: some prefill chunks and some single-token decodes,
run as one forward pass. Two kinds of model answer "how long":

- ``FittedModel``: least-squares fits of ``splitserve bench profile`` measurements (this CPU);
- ``RooflineModel``: a GPU's datasheet compute and memory bandwidth (``bench.sim.hardware``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bench.sim.host import Host
from engine.config import ModelConfig

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Chunk:
    """Prefill tokens of one prompt in a step: positions [start, start + tokens)."""

    tokens: int
    start: int = 0


@dataclass(frozen=True)
class Step:
    chunks: tuple[Chunk, ...] = ()
    decodes: int = 0
    context_sum: int = 0  # keys attended, summed over the decodes
    context_max: int = 0  # the longest decode's context

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.decodes


class LatencyModel(Protocol):
    name: str

    def step_s(self, step: Step) -> float: ...


def prefill_s(model: LatencyModel, tokens: int) -> float:
    """A lone prompt prefilled in one step."""
    return model.step_s(Step((Chunk(tokens),)))


def decode_step_s(model: LatencyModel, batch: int, context: int) -> float:
    """A step of ``batch`` decodes, each over ``context`` keys."""
    return model.step_s(Step((), batch, batch * context, context))


# -- the model's shape ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the latency models need of a model: parameter counts and KV bytes, at a dtype."""

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    q_size: int
    kv_size: int
    intermediate_size: int
    vocab_size: int
    num_parameters: int
    dtype_bytes: int

    @classmethod
    def of(cls, config: ModelConfig, dtype: str | None = None) -> ModelShape:
        return cls(
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.head_dim,
            config.q_size,
            config.kv_size,
            config.intermediate_size,
            config.vocab_size,
            config.num_parameters,
            _DTYPE_BYTES[dtype or config.dtype],
        )

    @property
    def linear_params(self) -> int:
        """Weights every token multiplies through (attention projections and MLP, all layers)."""
        h = self.hidden_size
        return self.num_layers * (
            h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate_size
        )

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.kv_size * self.dtype_bytes


# -- fitted (CPU) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedModel:
    """Step time as the sum of a prefill part and a decode part, fixed cost counted once::

        prefill chunk of t tokens after s computed = pa + pb*t + pc*t^2 + pd*t*s
        decode step of B sequences                 = da + db*B + dc*B*ctx_max
        mixed step                                 = max(pa, da) + mixed + mixed_per_token*t
                                                     + chunk parts + decode part

    ``pd`` apart from ``pc``: a chunk after cached tokens gathers them from the paged pool, a path
    slower per key than a fresh prompt's. ``ctx_max``: the engine pads every decode's gather to
    the longest context in the batch. ``mixed`` + ``mixed_per_token``*t (t: the step's prompt
    tokens): what a step with both costs beyond its parts, measured for small and full chunks
    (``bench profile``); a mixed step never takes less than either of its parts alone.
    """

    name: str
    prefill: tuple[float, float, float, float]
    decode: tuple[float, float, float]
    mixed: float = 0.0
    mixed_per_token: float = 0.0

    def step_s(self, step: Step) -> float:
        if step.is_empty:
            return 0.0
        pa, pb, pc, pd = self.prefill
        da, db, dc = self.decode
        prefill = sum(pb * c.tokens + pc * c.tokens * c.tokens + pd * c.tokens * c.start for c in step.chunks)
        decode = db * step.decodes + dc * step.decodes * step.context_max if step.decodes else 0.0
        if not step.decodes:
            return pa + prefill
        if not step.chunks:
            return da + decode
        beyond = self.mixed + self.mixed_per_token * sum(c.tokens for c in step.chunks)
        return max(max(pa, da) + beyond + prefill + decode, pa + prefill, da + decode)

    def calibrated(self, prefill_factor: float, decode_step_overhead_s: float) -> FittedModel:
        """Prefill costs times ``prefill_factor``; ``decode_step_overhead_s`` more per step with decodes."""
        pa, pb, pc, pd = (c * prefill_factor for c in self.prefill)
        da, db, dc = self.decode
        return FittedModel(
            f"{self.name} calibrated",
            (pa, pb, pc, pd),
            (da + decode_step_overhead_s, db, dc),
            self.mixed * prefill_factor,
            self.mixed_per_token * prefill_factor,
        )

    def times(self, factor: float) -> FittedModel:
        """Every step ``factor`` times as long."""
        return FittedModel(
            self.name,
            tuple(c * factor for c in self.prefill),
            tuple(c * factor for c in self.decode),
            self.mixed * factor,
            self.mixed_per_token * factor,
        )

    @classmethod
    def from_profile(cls, profile: dict, threads: int) -> FittedModel:
        """The fit for ``threads`` torch threads from a ``bench profile`` JSON report, with the toll
        of the other work on the machine while it was measured taken out (``bench.sim.host``): the
        engine with the cores to itself."""
        fits = profile["fits"]
        if str(threads) not in fits:
            raise ValueError(f"the profile has no fit for {threads} thread(s); it has {', '.join(sorted(fits))}")
        fit = fits[str(threads)]
        measured = cls(
            f"{profile['model']} cpu x{threads}",
            _coefficients(fit["prefill"], "abcd"),
            _coefficients(fit["decode"], "abc"),
            fit.get("mixed", {}).get("a", 0.0),
            fit.get("mixed", {}).get("b", 0.0),
        )
        cores, other = profile.get("machine", {}).get("cpu_count"), (fit.get("cpu") or {}).get("other_cores")
        if not cores or other is None:
            return measured
        return measured.times(1.0 / Host(cores, other).slowdown(threads, threads))


def _coefficients(fit: dict, names: str) -> tuple[float, ...]:
    return tuple(fit[name] for name in names)


# -- roofline (GPU) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense (no sparsity)
    hbm_tb_s: float
    memory_gb: float
    nvlink_gb_s: float  # per GPU, both directions
    nic_gbps: float  # RDMA NIC per GPU, gigabits/s: the prefill -> decode link


@dataclass(frozen=True)
class RooflineModel:
    """A step takes the longer of its FLOPs at the achievable compute rate and its bytes at the
    achievable memory bandwidth, plus a fixed per-step cost (scheduling, launches) and, with tensor
    parallelism, two all-reduces per layer over NVLink::

        flops = 2 * linear_params * tokens + 2 * vocab * hidden * sampled + 4 * layers * q_size * keys
        bytes = weights + kv_bytes_per_token * (keys read + tokens written)
    """

    gpu: GPU
    shape: ModelShape
    tp: int = 1
    compute_efficiency: float = 0.6  # achieved / peak tensor FLOP/s on large GEMMs
    bandwidth_efficiency: float = 0.8  # achieved / peak HBM bytes/s on streaming reads
    step_overhead_s: float = 0.002

    @property
    def name(self) -> str:
        return f"{self.gpu.name} x{self.tp}" if self.tp > 1 else self.gpu.name

    def step_s(self, step: Step) -> float:
        if step.is_empty:
            return 0.0
        shape = self.shape
        tokens = sum(c.tokens for c in step.chunks) + step.decodes
        sampled = len(step.chunks) + step.decodes
        # Keys attended: a chunk's token i sees start + i + 1 keys; a decode sees its context.
        prefill_keys = sum(c.tokens * c.start + c.tokens * (c.tokens + 1) // 2 for c in step.chunks)
        flops = (
            2 * shape.linear_params * tokens
            + 2 * shape.vocab_size * shape.hidden_size * sampled
            + 4 * shape.num_layers * shape.q_size * (prefill_keys + step.context_sum)
        )
        keys_read = sum(c.start + c.tokens for c in step.chunks) + step.context_sum
        memory = shape.weight_bytes + shape.kv_bytes_per_token * (keys_read + tokens)
        compute_s = flops / (self.gpu.bf16_tflops * 1e12 * self.compute_efficiency * self.tp)
        memory_s = memory / (self.gpu.hbm_tb_s * 1e12 * self.bandwidth_efficiency * self.tp)
        return max(compute_s, memory_s) + self.step_overhead_s + self._all_reduce_s(tokens)

    def _all_reduce_s(self, tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        # Ring all-reduce moves 2 (tp - 1) / tp of the activations; unidirectional NVLink is half the total.
        payload = tokens * self.shape.hidden_size * self.shape.dtype_bytes * 2 * (self.tp - 1) / self.tp
        return 2 * self.shape.num_layers * payload / (self.gpu.nvlink_gb_s / 2 * 1e9)

    def kv_capacity_tokens(self, memory_fraction: float = 0.9) -> int:
        """KV tokens that fit in the instance's HBM after the weights (``memory_fraction`` usable)."""
        free = self.gpu.memory_gb * 1e9 * self.tp * memory_fraction - self.shape.weight_bytes
        if free <= 0:
            raise ValueError(f"{self.shape.weight_bytes / 1e9:.0f} GB of weights do not fit on {self.name}; raise --tp")
        return int(free // self.shape.kv_bytes_per_token)
