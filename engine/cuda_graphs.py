"""CUDA graphs for decode-only steps: one graph per (batch bucket, block-table width bucket).

A decode step's launch overhead (hundreds of small kernels) dominates small models on a GPU; a
captured graph replays them in one call. Shapes must be static, so a step is padded up::

    rows:    | d0 | d1 | ... | d(n-1) | pad ... pad |        batch -> next bucket (1, 2, 4, 8, ...)
    table:   | b b b b . . |                                 width -> next power of two (in blocks)
    pad row: token/position of d0, writes its K/V into the scratch block, attends to slot 0 only

Pad rows never touch a live block: the engine sets one block aside (``scratch_block``) for them.
Steps with a prefill chunk, a larger batch or a wider table run eagerly. A graph always holds the torch
path's decode attention (a gather of the padded table into one static buffer), whatever backend the
runner attends with otherwise: FlexAttention's per-step block mask is no static buffer, so on CUDA
prefill and mixed steps run flex eagerly and decode-only steps replay; ``replays`` counts them. The
padding is plain torch and runs on CPU (tests/engine/test_cuda_graphs.py); capture and replay need CUDA.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.attention import AttentionBatch, TorchPagedAttention
from engine.kv_cache import PagedKVCache

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    return tuple(b for b in DEFAULT_BATCH_BUCKETS if b < max_batch) + (max_batch,) if max_batch > 0 else ()


def bucket_for(size: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``size``; None when it is larger than every bucket."""
    return next((b for b in buckets if b >= size), None)


def width_bucket(width: int) -> int:
    return 1 << max(0, width - 1).bit_length()


def is_decode_only(batch: AttentionBatch) -> bool:
    return not batch.prefills and batch.decode_block_table is not None and batch.decode_begin == 0


def pad_decode_step(inputs, batch_size: int, width: int, block_size: int, scratch_block: int):
    """``inputs`` (a decode-only StepInputs) padded to ``batch_size`` rows and ``width`` table blocks."""
    batch = inputs.batch
    rows, old_width = batch.decode_block_table.shape
    pad = batch_size - rows
    assert pad >= 0 and width >= old_width, (rows, batch_size, old_width, width)
    device = batch.decode_block_table.device

    def rows_of(tensor: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, filler.expand(pad, *tensor.shape[1:])]) if pad else tensor

    table = torch.zeros((batch_size, width), dtype=torch.long, device=device)
    table[:rows, :old_width] = batch.decode_block_table
    table[rows:, 0] = scratch_block
    mask = torch.zeros((batch_size, 1, 1, width * block_size), dtype=torch.bool, device=device)
    mask[:rows, ..., : old_width * block_size] = batch.decode_mask
    mask[rows:, ..., 0] = True
    padded_batch = dataclasses.replace(
        batch,
        slot_block=rows_of(batch.slot_block, torch.tensor([scratch_block], device=device)),
        slot_offset=rows_of(batch.slot_offset, torch.zeros(1, dtype=torch.long, device=device)),
        decode_block_table=table,
        decode_mask=mask,
        plan=None,  # a graph reads the padded table: never the CPU decode scratch's rows
    )
    return dataclasses.replace(
        inputs,
        input_ids=rows_of(inputs.input_ids, inputs.input_ids[:1]),
        positions=rows_of(inputs.positions, inputs.positions[:1]),
        batch=padded_batch,
        logits_rows=torch.arange(batch_size, device=device),
    )


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: object  # the StepInputs whose tensors the graph reads (static buffers)
    logits: torch.Tensor  # the graph's output buffer


class CudaGraphDecoder:
    """Captures lazily, on the first step of each shape; replays after. Engine thread only."""

    def __init__(self, model, cache: PagedKVCache, max_batch: int, scratch_block: int, max_width: int) -> None:
        self.model = model
        self.cache = cache
        self.buckets = batch_buckets(max_batch)
        self.scratch_block = scratch_block
        self.max_width = width_bucket(max_width)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None  # one memory pool shared by every graph
        self.attention = TorchPagedAttention()  # what every graph attends with (see the module's note)
        self.replays = 0  # steps that ran as a graph replay: what a report may claim, not that graphs are on

    @property
    def captures(self) -> int:
        return len(self._graphs)

    def shape_for(self, inputs) -> tuple[int, int] | None:
        """(batch bucket, width bucket) the step would replay at, or None to run it eagerly."""
        batch = inputs.batch
        if not is_decode_only(batch):
            return None
        size = bucket_for(batch.decode_block_table.shape[0], self.buckets)
        width = width_bucket(batch.decode_block_table.shape[1])
        return None if size is None or width > self.max_width else (size, width)

    def run(self, inputs, shape: tuple[int, int]) -> torch.Tensor:
        """Logits of the step's real rows, ``[rows, vocab]``."""
        padded = pad_decode_step(inputs, *shape, self.cache.layout.block_size, self.scratch_block)
        entry = self._graphs.get(shape)
        if entry is None:
            entry = self._graphs[shape] = self._capture(padded)
        for name in ("input_ids", "positions", "logits_rows"):
            getattr(entry.inputs, name).copy_(getattr(padded, name))
        for name in ("slot_block", "slot_offset", "decode_block_table", "decode_mask"):
            getattr(entry.inputs.batch, name).copy_(getattr(padded.batch, name))
        entry.graph.replay()
        self.replays += 1
        return entry.logits[: inputs.batch.decode_block_table.shape[0]]

    def _capture(self, padded) -> _Graph:
        static = dataclasses.replace(padded, batch=dataclasses.replace(padded.batch, backend=self.attention))
        forward = lambda: self.model(  # noqa: E731
            static.input_ids, static.positions, self.cache, static.batch, static.logits_rows, None
        )
        device = self.cache.data.device
        with torch.cuda.device(device):  # the capture stream torch.cuda.graph makes is the current device's
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                forward()  # warm-up: lazy initialisation must not happen inside the capture
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = forward()
        self._pool = graph.pool()
        return _Graph(graph, static, logits)
