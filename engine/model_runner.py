"""Turns a SchedulerOutput into tensors, runs the model, samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, AttentionBatch, PrefillSegment, StepSequences, select_attention_backend
from engine.decode_scratch import ScratchStep
from engine.kv_cache import PagedKVCache
from engine.layer_ready import LayerReady, record_layer_ready
from engine.model import CausalLM
from engine.sampler import Sampler, SampleResult, SamplingState, TokenLogprobs
from engine.scheduler import ScheduledChunk, SchedulerOutput

PACKED_WEIGHTS_BATCH_HINT = 32  # rows the CPU weight layout is tuned for: a decode batch

LayerHook = Callable[[SchedulerOutput, int, LayerReady], None]
"""``on_layer_done(plan, layer, ready)``: called on the engine thread after each layer of a step.

``ready`` is recorded on the compute stream behind that layer's K/V writes (a ``torch.cuda.Event``
on CUDA, the already-complete ``COMPLETED`` on CPU). The hook must not read the layer's pool
regions before ``ready`` completed, and must not wait for it on the engine thread or the compute
stream: hand the read to a side stream (``wait_event``) or a sender thread (``synchronize``).
See engine/layer_ready.py."""


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttentionBatch
    logits_rows: torch.Tensor
    sampled_ids: tuple[str, ...]  # request ids of the first rows in logits_rows
    scored_chunks: tuple[ScheduledChunk, ...] = ()  # their prompt-scoring rows follow, chunk by chunk


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, tuple[int, TokenLogprobs | None]]  # request id -> (sampled token id, its logprobs)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]]  # request id -> (chunk.scored_from, entries)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        sampler: Sampler,
        device: str,
        attention: AttentionBackend | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = device
        self.block_size = cache.layout.block_size
        self.attention = attention if attention is not None else select_attention_backend(device)
        self.graphs = None  # engine.cuda_graphs.CudaGraphDecoder, set by the engine on CUDA
        model.pack_linear_weights(batch_hint=PACKED_WEIGHTS_BATCH_HINT)

    def execute(
        self, output: SchedulerOutput, states: dict[str, SamplingState], on_layer_done: LayerHook | None = None
    ) -> StepResult:
        """Runs one step: the sampled tokens, and the prompt logprobs of chunks that score their prompt."""
        inputs = self.prepare(output.chunks)
        logits = self._forward(inputs, output, on_layer_done)
        num_sampled = len(inputs.sampled_ids)
        scored, row = {}, num_sampled
        for chunk in inputs.scored_chunks:
            count, top = len(chunk.prompt_targets), states[chunk.request_id].params.prompt_logprobs
            rows = logits[row : row + count]
            scored[chunk.request_id] = (
                chunk.scored_from,
                self.sampler.prompt_logprobs(rows, chunk.prompt_targets, top),
            )
            row += count
        if not num_sampled:
            return StepResult({}, scored)
        result: SampleResult = self.sampler.sample(logits[:num_sampled], [states[r] for r in inputs.sampled_ids])
        sampled = {rid: (tok, lp) for rid, tok, lp in zip(inputs.sampled_ids, result.token_ids, result.logprobs)}
        return StepResult(sampled, scored)

    def _forward(self, inputs: StepInputs, output: SchedulerOutput, on_layer_done: LayerHook | None) -> torch.Tensor:
        shape = self.graphs.shape_for(inputs) if self.graphs is not None else None
        if shape is None:
            hook = (lambda layer, ready: on_layer_done(output, layer, ready)) if on_layer_done else None
            return self.model(inputs.input_ids, inputs.positions, self.cache, inputs.batch, inputs.logits_rows, hook)
        logits = self.graphs.run(inputs, shape)
        if on_layer_done is not None:
            ready = record_layer_ready(logits.device)  # behind the whole replay: every layer's K/V writes
            for layer in range(self.cache.layout.num_layers):
                on_layer_done(output, layer, ready)
        return logits

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        prefills: list[PrefillSegment] = []
        logits_rows: list[int] = []
        scoring_rows: list[int] = []
        sampled: list[str] = []
        decodes = [c for c in chunks if len(c.token_ids) == 1]
        for chunk in chunks:
            begin = len(ids)
            first = begin + chunk.scored_from - chunk.start
            scoring_rows.extend(range(first, first + len(chunk.prompt_targets)))
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
        plan = self._attention_plan(chunks, position, len(decodes))
        # The decode scratch holds the decodes' KV itself: their padded block table would go unread.
        decode_table, decode_mask = (None, None) if isinstance(plan, ScratchStep) else self._decode_tensors(decodes)
        batch = AttentionBatch(
            slot_block=slot_block.to(self.device),
            slot_offset=(position % bs).to(self.device),
            prefills=tuple(prefills),
            decode_begin=len(ids) - len(decodes),
            decode_block_table=decode_table,
            decode_mask=decode_mask,
            backend=self.attention,
            plan=plan,
        )
        return StepInputs(
            torch.tensor(ids, device=self.device),
            position.to(self.device),
            batch,
            torch.tensor(logits_rows + scoring_rows, dtype=torch.long, device=self.device),
            tuple(sampled),
            tuple(c for c in chunks if c.prompt_targets),
        )

    def _attention_plan(self, chunks: Sequence[ScheduledChunk], positions: torch.Tensor, num_decodes: int) -> object:
        bs = self.block_size
        lengths = torch.tensor([len(c.token_ids) for c in chunks])
        sequences = StepSequences(
            row_sequence=torch.repeat_interleave(torch.arange(len(chunks)), lengths),
            positions=positions,
            block_tables=tuple(tuple(c.block_ids[: -(-(c.start + len(c.token_ids)) // bs)]) for c in chunks),
            block_size=bs,
            num_blocks=self.cache.layout.num_blocks,
            serials=tuple(c.serial for c in chunks),
            num_decodes=num_decodes,
        )
        return self.attention.plan(sequences, self.cache)

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
