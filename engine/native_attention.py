"""The CPU decode-attention kernel (engine/native/decode_attention.c): compiled on first use with the
machine's C compiler, loaded with ctypes, used by the torch attention path for the decode scratch.

Why native code: on CPU, SDPA's flash kernel is built for many query rows; a decode step has one per
sequence, and it reads the KV at about half the speed a streaming loop does (``splitserve bench
engine`` prints which kernel ran). Where it cannot run — no C compiler (the slim container image),
not x86 with AVX2 and FMA, a build that fails, a shape it does not take — SDPA runs instead, and the
reason is logged once.

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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "decode_attention.c"
MAX_HEAD_DIM = 256  # the kernel's fixed buffers (decode_attention.c)
MAX_GROUP = 16
_FLAG_SETS = (("-O3", "-fopenmp"), ("-O3",))  # without OpenMP (a compiler lacking it) the kernel runs on one thread
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


class NativeDecodeAttention:
    """``kernel(q, key, value, lengths, scale)``: q ``[B, H, D]``, key/value ``[B, KVH, S, D]``, lengths
    ``[B]`` int64 (row b attends keys ``[0, lengths[b])``, each at least 1) -> ``[B, H, D]``.
    Callers check ``accepts`` first."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._call = library.decode_attention
        self._call.restype = _INT
        self._call.argtypes = [_INT, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64]
        self._call.argtypes += [_INT, _INT, _INT, ctypes.c_float, _PTR, _INT]

    @staticmethod
    def accepts(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
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

    def __call__(self, q, key, value, lengths: torch.Tensor, scale: float) -> torch.Tensor:
        batch, heads, head_dim = q.shape
        out = torch.empty((batch, heads, head_dim), dtype=q.dtype)
        lengths = lengths.to(torch.int64).contiguous()
        status = self._call(
            int(q.dtype == torch.bfloat16),
            q.data_ptr(), q.stride(0), q.stride(1),
            key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
            value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
            lengths.data_ptr(), batch, heads, key.shape[1], head_dim, scale,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"native decode attention refused q {tuple(q.shape)} k {tuple(key.shape)} {q.dtype}")
        return out


_lock = threading.Lock()
_loaded: dict[str, NativeDecodeAttention | None] = {}


def native_decode_attention() -> NativeDecodeAttention | None:
    """The kernel, built and loaded once per process; None where it cannot run here (reason logged)."""
    with _lock:
        if "kernel" not in _loaded:
            kernel, why = _load()
            if kernel is None:
                log.info("CPU decode attention: SDPA (native kernel unavailable: %s)", why)
            else:
                log.info("CPU decode attention: native kernel %s", kernel.path)
            _loaded["kernel"] = kernel
        return _loaded["kernel"]


def _load() -> tuple[NativeDecodeAttention | None, str]:
    if os.uname().machine not in ("x86_64", "AMD64"):
        return None, f"the kernel is x86 (AVX2) code, this is {os.uname().machine}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc) on PATH"
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building {SOURCE.name} with {compiler} failed: {exc}"
    library.decode_attention_supported.restype = _INT
    if not library.decode_attention_supported():
        return None, "this CPU lacks AVX2 or FMA"
    return NativeDecodeAttention(library, path), ""


def _build(compiler: str) -> Path:
    """The cached shared object for this source and compiler, compiled if absent (atomically renamed into
    place, so concurrent workers never load a half-written file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitserve"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"splitserve-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"decode_attention-{key}.so"
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
