"""Turns a SchedulerOutput into tensors, runs the model, samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.attention import AttentionBatch, PrefillSegment
from engine.kv_cache import PagedKVCache
from engine.model import CausalLM
from engine.sampler import Sampler, SampleResult, SamplingState
from engine.scheduler import ScheduledChunk, SchedulerOutput

LayerHook = Callable[[SchedulerOutput, int], None]


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttentionBatch
    logits_rows: torch.Tensor
    sampled_ids: tuple[str, ...]  # request ids of the rows in logits_rows


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, sampler: Sampler, device: str) -> None:
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = device
        self.block_size = cache.layout.block_size

    def execute(
        self, output: SchedulerOutput, states: dict[str, SamplingState], on_layer_done: LayerHook | None = None
    ) -> dict[str, tuple[int, object]]:
        """Runs one step; returns request id -> (sampled token id, TokenLogprobs | None)."""
        inputs = self.prepare(output.chunks)
        hook = (lambda layer: on_layer_done(output, layer)) if on_layer_done else None
        logits = self.model(inputs.input_ids, inputs.positions, self.cache, inputs.batch, inputs.logits_rows, hook)
        if not inputs.sampled_ids:
            return {}
        result: SampleResult = self.sampler.sample(logits, [states[r] for r in inputs.sampled_ids])
        return {rid: (tok, lp) for rid, tok, lp in zip(inputs.sampled_ids, result.token_ids, result.logprobs)}

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        prefills: list[PrefillSegment] = []
        logits_rows: list[int] = []
        sampled: list[str] = []
        decodes = [c for c in chunks if len(c.token_ids) == 1]
        for chunk in chunks:
            begin = len(ids)
            ids.extend(chunk.token_ids)
            positions.append(torch.arange(chunk.start, chunk.start + len(chunk.token_ids)))
            if len(chunk.token_ids) > 1:
                table = torch.tensor(chunk.block_ids[: -(-(chunk.start + len(chunk.token_ids)) // bs)])
                prefills.append(PrefillSegment(begin, len(ids), chunk.start, table.to(self.device)))
            if chunk.samples:
                logits_rows.append(len(ids) - 1)
                sampled.append(chunk.request_id)
        position = torch.cat(positions)
        tables = [c.block_ids for c in chunks]
        slot_block = torch.tensor([tables[i][p // bs] for i, p in self._positions_by_chunk(chunks)], dtype=torch.long)
        decode_table, decode_mask = self._decode_tensors(decodes)
        batch = AttentionBatch(
            slot_block=slot_block.to(self.device),
            slot_offset=(position % bs).to(self.device),
            prefills=tuple(prefills),
            decode_begin=len(ids) - len(decodes),
            decode_block_table=decode_table,
            decode_mask=decode_mask,
        )
        return StepInputs(
            torch.tensor(ids, device=self.device),
            position.to(self.device),
            batch,
            torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            tuple(sampled),
        )

    @staticmethod
    def _positions_by_chunk(chunks: Sequence[ScheduledChunk]):
        for index, chunk in enumerate(chunks):
            for position in range(chunk.start, chunk.start + len(chunk.token_ids)):
                yield index, position

    def _decode_tensors(self, decodes: Sequence[ScheduledChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not decodes:
            return None, None
        bs = self.block_size
        context = [c.start + 1 for c in decodes]
        width = max(-(-n // bs) for n in context)
        table = torch.zeros((len(decodes), width), dtype=torch.long)
        for row, chunk in enumerate(decodes):
            used = chunk.block_ids[:width]
            table[row, : len(used)] = torch.tensor(used)
        mask = torch.arange(width * bs)[None, :] < torch.tensor(context)[:, None]
        return table.to(self.device), mask[:, None, None, :].to(self.device)
