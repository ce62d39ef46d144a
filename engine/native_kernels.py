"""splitserve's CPU kernels (engine/native/cpu_kernels.c): compiled on first use with the machine's C
compiler, loaded with ctypes.

- ``decode_attention``: the decode scratch's attention (engine/attention.py). On CPU, SDPA's flash
  kernel is built for many query rows; a decode step has one per sequence, and it reads the KV at
  about half the speed a streaming loop does.
- ``add_rms_norm``, ``rotary``, ``silu_mul``, ``store_kv``: a decoder layer's elementwise steps in bf16
  (engine/model.py, engine/attention.py). torch runs each as three to seven kernels, which on a decode
  batch's few rows cost more to start than to run; these round bf16 where torch does, so the output
  is torch's. Written once (engine/native/bf16_steps.h), built for AVX-512 BF16 and for AVX2.
- ``argmax``: the greedy pick over bf16 logits (engine/sampler.py), 6x faster than ``max(dim=-1)``.

Where they cannot run — no C compiler (the slim container image), not x86 with AVX2 and FMA, a build
that fails, or ``SPLITSERVE_CPU_KERNELS=torch`` (``avx2``: what a CPU without AVX-512 BF16 runs)
— torch runs instead, and the reason is logged once; a shape or dtype a kernel does not take
goes to torch too (``accepts``, ``elementwise_for``). ``splitserve bench engine`` prints which ran.

The shared object is cached under ``$XDG_CACHE_HOME/splitserve`` (``~/.cache/splitserve``), named by a
hash of the source and the compiler, so a changed kernel or compiler rebuilds it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from engine.errors import EngineError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "cpu_kernels.c"
MAX_HEAD_DIM = 256  # decode_attention's fixed buffers (cpu_kernels.c)
MAX_GROUP = 16
_FLAG_SETS = (("-O3", "-fno-math-errno", "-fopenmp"), ("-O3", "-fno-math-errno"))  # no OpenMP: attention on 1 thread
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


class NativeKernels:
    """The loaded library. Callers check ``accepts`` (attention) or ``elementwise_for`` first."""

    def __init__(self, library: ctypes.CDLL, path: Path, avx512: bool = True) -> None:
        self.path = path
        self._attention = _bind(library.decode_attention, [_INT, *[_PTR, _I64, _I64], *[_PTR, _I64, _I64, _I64] * 2])
        self._attention.argtypes += [_PTR, _I64, _INT, _INT, _INT, ctypes.c_float, _PTR, _INT, _INT]
        library.avx512_bf16_supported.restype = _INT
        # The instruction set the bf16 steps and attention's bf16 path run on: AVX-512 BF16 where the CPU has
        # it and the mode allows, else AVX2.
        self.isa = "avx512" if avx512 and library.avx512_bf16_supported() else "avx2"
        self.bf16_elementwise = True  # add_rms_norm, rotary, silu_mul, store_kv, argmax (a test turns them off)
        # On AVX2, e^x and the division make SiLU-and-multiply slower than torch's (79 vs 34 us at 32 x 2048).
        self.fast_silu_mul = self.isa == "avx512"
        names = ("add_rms_norm", "rotary", "silu_mul", "argmax")
        steps = {name: getattr(library, f"{name}_{self.isa}") for name in names}
        self._add_rms_norm = _bind(steps["add_rms_norm"], [_PTR, _PTR, _PTR, _I64, _I64, ctypes.c_float, _PTR])
        self._rotary = _bind(steps["rotary"], [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR])
        self._silu_mul = _bind(steps["silu_mul"], [_PTR, _I64, _I64, _PTR])
        self._argmax = _bind(steps["argmax"], [_PTR, _I64, _I64, _I64, _PTR, _INT])
        self._store_kv = _bind(library.store_kv_bf16, [_PTR, _I64, _PTR, _I64, *[_I64] * 3, _PTR, _I64, _PTR, _PTR])
        self._store_kv.argtypes += [_PTR, _PTR, *[_I64] * 4, _PTR, _PTR]

    @staticmethod
    def accepts(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether ``decode_attention`` takes these tensors (its fixed buffers, dtypes and strides)."""
        heads, kv_heads, head_dim = q.shape[1], key.shape[1], q.shape[2]
        return (
            q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float32)
            and q.dtype == key.dtype == value.dtype
            and head_dim % 8 == 0
            and head_dim <= MAX_HEAD_DIM
            and heads % kv_heads == 0
            and heads // kv_heads <= MAX_GROUP
            and q.stride(2) == key.stride(3) == value.stride(3) == 1
        )

    def decode_attention(self, q, key, value, lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """q ``[B, H, D]``, key/value ``[B, KVH, S, D]``, lengths ``[B]`` (row b attends keys ``[0, lengths[b])``,
        each at least 1) -> ``[B, H, D]``."""
        batch, heads, head_dim = q.shape
        out = torch.empty((batch, heads, head_dim), dtype=q.dtype)
        lengths = lengths.to(torch.int64).contiguous()
        status = self._attention(
            int(q.dtype == torch.bfloat16),
            q.data_ptr(), q.stride(0), q.stride(1),
            key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
            value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
            lengths.data_ptr(), batch, heads, key.shape[1], head_dim, scale,
            out.data_ptr(), torch.get_num_threads(), int(self.isa == "avx512"),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"native decode attention refused q {tuple(q.shape)} k {tuple(key.shape)} {q.dtype}")
        return out

    def add_rms_norm(self, x, residual, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight * rms_norm(r), r)`` with ``r = x + residual`` (``residual`` updated in place), or ``r = x``."""
        x = x.contiguous()
        out = torch.empty_like(x)
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        stream = residual.data_ptr() if residual is not None else None
        self._add_rms_norm(x.data_ptr(), stream, weight.data_ptr(), rows, dim, eps, out.data_ptr())
        return out, residual if residual is not None else x

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x ``[T, heads, D]`` (heads and D contiguous within a token), cos/sin ``[T, 1, D]`` -> ``[T, heads, D]``."""
        tokens, heads, head_dim = x.shape
        out = torch.empty((tokens, heads, head_dim), dtype=x.dtype)
        self._rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0), tokens, heads, head_dim,
                     out.data_ptr())  # fmt: skip
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``[T, 2I]`` (gate | up, contiguous) -> silu(gate) * up ``[T, I]``."""
        tokens, inner = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty((tokens, inner), dtype=gate_up.dtype)
        self._silu_mul(gate_up.data_ptr(), tokens, inner, out.data_ptr())
        return out

    def store_kv(self, cache, layer: int, key, value, slot_block, slot_offset, scratch, decode_begin: int) -> bool:
        """A step's new K/V ``[tokens, kv_heads, head_dim]`` into the pool at (slot_block, slot_offset), non-finite
        values as 0 (``PagedKVCache.write``), and the decodes' (rows from ``decode_begin``) into the decode
        scratch too (``ScratchStep.append``, when ``scratch`` is one), in one pass. False, having stored
        nothing: not bf16 where this CPU has AVX-512 BF16, or not that layout (torch's path then)."""
        head_dim = key.shape[-1]
        if (
            not self.bf16_elementwise
            or key.device.type != "cpu"
            or cache.data.device.type != "cpu"
            or key.dtype != torch.bfloat16
            or value.dtype != torch.bfloat16
            or cache.data.dtype != torch.bfloat16
            or key.stride(2) != 1
            or key.stride(1) != head_dim
            or value.stride(2) != 1
            or value.stride(1) != head_dim
        ):
            return False
        slot_block, slot_offset = slot_block.contiguous(), slot_offset.contiguous()
        scratch_k = scratch_v = None
        strides = (0, 0, 0)
        rows = positions = None
        if scratch is not None:
            storage_k, storage_v = scratch.storage[layer, 0], scratch.storage[layer, 1]
            scratch_k, scratch_v = storage_k.data_ptr(), storage_v.data_ptr()
            strides = (storage_k.stride(0), storage_k.stride(1), storage_k.stride(2))
            rows, positions = scratch.rows.data_ptr(), scratch.positions.data_ptr()
        self._store_kv(
            key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0), key.shape[0], key.shape[1], head_dim,
            cache.data[layer].data_ptr(), cache.layout.block_size, slot_block.data_ptr(), slot_offset.data_ptr(),
            scratch_k, scratch_v, *strides, decode_begin, rows, positions,
        )  # fmt: skip
        return True

    def argmax(self, logits: torch.Tensor) -> list[int]:
        """Each row's first maximum (a NaN counts as the maximum), as ``logits.max(dim=-1).indices``."""
        rows, cols = logits.shape
        out = torch.empty(rows, dtype=torch.int64)
        self._argmax(logits.data_ptr(), rows, cols, logits.stride(0), out.data_ptr(), torch.get_num_threads())
        return out.tolist()


def elementwise_for(*tensors: torch.Tensor, row_multiple: int = 16) -> NativeKernels | None:
    """The kernels for a decoder layer's elementwise step (or greedy ``argmax``) over ``tensors``, or None
    (torch then): they take CPU bf16 tensors whose rows (last dimension) are contiguous and a multiple of
    ``row_multiple`` long. The caller checks any other layout its kernel needs."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype != torch.bfloat16:
        return None
    kernels = native_kernels()
    if kernels is None or not kernels.bf16_elementwise:
        return None
    for tensor in tensors:
        if tensor.dtype != torch.bfloat16 or tensor.shape[-1] % row_multiple or tensor.stride(-1) != 1:
            return None
    return kernels


def _bind(function, argtypes: list):
    function.restype = _INT
    function.argtypes = argtypes
    return function


# Which kernels run: the fastest builds this CPU can run (auto), the AVX2 builds (avx2: what a CPU without
# AVX-512 BF16 runs), or none (torch). Read at each lookup; an engine's start refuses any other value, naming it.
CPU_KERNELS_ENV = "SPLITSERVE_CPU_KERNELS"
CPU_KERNEL_MODES = ("auto", "avx2", "torch")

_lock = threading.Lock()
_loaded: dict[str, NativeKernels | None] = {}  # by mode


def native_kernels() -> NativeKernels | None:
    """The kernels, built and loaded once per process and mode; None where they cannot run here, or
    SPLITSERVE_CPU_KERNELS=torch (the reason logged once)."""
    mode = os.environ.get(CPU_KERNELS_ENV) or "auto"
    if mode in _loaded:  # every elementwise step of every layer asks: no lock once loaded
        return _loaded[mode]
    if mode not in CPU_KERNEL_MODES:
        raise EngineError(f"{CPU_KERNELS_ENV} must be one of {', '.join(CPU_KERNEL_MODES)}, got {mode!r}")
    with _lock:
        if mode not in _loaded:
            kernel, why = (None, f"{CPU_KERNELS_ENV}=torch") if mode == "torch" else _load(avx512=mode == "auto")
            if kernel is None:
                log.info("CPU kernels: torch's (native kernels unavailable: %s)", why)
            else:
                log.info("CPU kernels: native, %s (bf16 elementwise: %s)", kernel.path, kernel.bf16_elementwise)
            _loaded[mode] = kernel
        return _loaded[mode]


def _load(avx512: bool) -> tuple[NativeKernels | None, str]:
    if os.uname().machine not in ("x86_64", "AMD64"):
        return None, f"the kernels are x86 (AVX2) code, this is {os.uname().machine}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc) on PATH"
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building {SOURCE.name} with {compiler} failed: {exc}"
    library.avx2_supported.restype = _INT
    if not library.avx2_supported():
        return None, "this CPU lacks AVX2 or FMA"
    return NativeKernels(library, path, avx512), ""


def _build(compiler: str) -> Path:
    """The cached shared object for this source and compiler, compiled if absent (atomically renamed into
    place, so concurrent workers never load a half-written file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = b"".join(path.read_bytes() for path in sorted(SOURCE.parent.glob("*.[ch]")))  # with its header
    key = hashlib.sha256(sources + version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitserve"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"splitserve-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    errors = []
    for flags in _FLAG_SETS:
        partial = cache / f".{target.name}.{os.getpid()}.tmp"
        command = [compiler, *flags, "-shared", "-fPIC", "-o", str(partial), str(SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            os.replace(partial, target)
            return target
        errors.append(result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"])
    raise subprocess.SubprocessError("; ".join(e[0] for e in errors))
