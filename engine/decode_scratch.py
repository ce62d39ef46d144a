"""The CPU decode scratch: each decoding sequence's K/V kept batch-major between steps, so a decode step
appends one position per sequence instead of gathering every sequence's blocks from the pool again.

    storage[layer, K|V, row, kv_head, position, head_dim]     rows [0, n): this step's n decodes
    row r:  [ positions 0 .. p-1: copy of the pool | p: written this step | zeros ... capacity )

Heads before positions: SDPA then reads each (row, head) as one contiguous run of keys.

The pool stays the owner of KV: every step still writes it, transports read it, and the scratch is a
copy that is trusted only while it provably equals the pool. A row is kept for a decode at position p
only if the same request incarnation (``ScheduledChunk.serial``) was a decode of the previous plan, at
position p - 1, in that row. Anything else — a new or resumed sequence, a preempted and recomputed
one, one skipped for a step, a step that failed and runs again (its plan already claimed p + 1) — is
refilled from the pool. Masked positions of a row are zeros, never stale data: a key or value that
is NaN or inf there would survive the zero attention weight (0 * NaN = NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import PagedKVCache

DECODE_SCRATCH_MAX_BYTES = 1 << 30  # above this the decodes gather from the pool each step instead
_CAPACITY_QUANTUM = 128  # positions: the capacity grows in these steps (and at least doubles)


@dataclass(frozen=True)
class ScratchStep:
    """One step's use of the scratch, shared by every layer: decode i is in ``rows[i]``, at ``positions[i]``."""

    storage: torch.Tensor
    rows: torch.Tensor  # [n] long
    positions: torch.Tensor  # [n] long
    order: torch.Tensor | None  # [n] long: the decode in each row; None when rows == arange(n)
    width: int  # keys attended: max(positions) + 1
    mask: torch.Tensor | None  # [n, 1, 1, width] True where attended, in row order; None if all see width keys
    lengths: torch.Tensor  # [n] long: keys attended by each row (its position + 1), in row order

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores this step's K/V ``[n, kv_heads, head_dim]`` (decode order) at each row's position."""
        self.storage[layer, 0].transpose(1, 2).index_put_((self.rows, self.positions), key)
        self.storage[layer, 1].transpose(1, 2).index_put_((self.rows, self.positions), value)

    def key_value(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, kv_heads, width, head_dim]`` views of rows [0, n), in row order."""
        n = self.rows.numel()
        return self.storage[layer, 0, :n, :, : self.width], self.storage[layer, 1, :n, :, : self.width]


class DecodeScratch:
    """Owns the scratch storage and which row holds which sequence. Engine thread only (like the pool).

    ``max_bytes``: the storage never grows past it; a step that would need more gathers (``plan`` returns
    None) and every row is forgotten."""

    def __init__(self, max_bytes: int = DECODE_SCRATCH_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._storage: torch.Tensor | None = None
        self._owners: dict[int, tuple[int, int]] = {}  # serial -> (row, positions it holds after its last plan)
        self._dirty: list[int] = []  # per row: positions at and beyond this are zero
        self.rows_refilled = 0  # rows copied from the pool so far (how often the append path missed)

    @property
    def rows_held(self) -> int:
        return len(self._owners)

    def forget(self) -> None:
        """Trust no row: the next plan refills every decode from the pool."""
        self._owners.clear()

    def plan(
        self,
        cache: PagedKVCache,
        serials: list[int],
        positions: list[int],
        block_tables: list[tuple[int, ...]],
    ) -> ScratchStep | None:
        """Assigns this step's decodes (serial, position p, blocks covering [0, p]) to rows [0, n), refills
        the rows it cannot trust from the pool, and claims p + 1 positions for each. None: over budget."""
        n = len(serials)
        width = max(positions) + 1
        if not self._reserve(cache, n, width):
            self.forget()
            return None
        kept = {
            serial: row
            for serial, position in zip(serials, positions)
            for row, held in [self._owners.get(serial, (-1, -1))]
            if 0 <= row < n and held == position
        }
        free = iter(sorted(set(range(n)) - set(kept.values())))
        rows = [kept[s] if s in kept else next(free) for s in serials]
        self._refill(
            cache,
            [(row, pos, table) for s, row, pos, table in zip(serials, rows, positions, block_tables) if s not in kept],
        )
        self._owners = {s: (row, pos + 1) for s, row, pos in zip(serials, rows, positions)}
        for row, position in zip(rows, positions):
            self._dirty[row] = max(self._dirty[row], position + 1)
        return self._step(rows, positions, width)

    def _step(self, rows: list[int], positions: list[int], width: int) -> ScratchStep:
        n = len(rows)
        by_row = [0] * n
        for row, position in zip(rows, positions):
            by_row[row] = position + 1
        lengths = torch.tensor(by_row, dtype=torch.long)
        mask = None
        if min(positions) + 1 < width:
            mask = (torch.arange(width)[None, :] < lengths[:, None])[:, None, None, :]
        order = None
        if rows != list(range(n)):
            order = torch.empty(n, dtype=torch.long)
            order[rows] = torch.arange(n)
        return ScratchStep(
            self._storage,
            torch.tensor(rows, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            order,
            width,
            mask,
            lengths,
        )

    def _reserve(self, cache: PagedKVCache, rows: int, width: int) -> bool:
        """Storage for ``rows`` x ``width`` positions (kept rows keep their contents); False if over budget."""
        layout = cache.layout
        storage = self._storage
        if storage is not None and (
            storage.dtype != cache.data.dtype
            or storage.device != cache.data.device
            or (storage.shape[0], storage.shape[3], storage.shape[5])
            != (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        ):
            storage = self._storage = None  # another pool's layout: start over
        if storage is not None and storage.shape[2] >= rows and storage.shape[4] >= width:
            return True
        old_rows, old_capacity = (storage.shape[2], storage.shape[4]) if storage is not None else (0, 0)
        capacity = old_capacity
        if width > old_capacity:
            capacity = max(-(-width // _CAPACITY_QUANTUM) * _CAPACITY_QUANTUM, 2 * old_capacity)
        rows = max(rows, old_rows)
        shape = (layout.num_layers, 2, rows, layout.num_kv_heads, capacity, layout.head_dim)
        if torch.Size(shape).numel() * cache.data.element_size() > self.max_bytes:
            return False
        grown = torch.zeros(shape, dtype=cache.data.dtype, device=cache.data.device)
        if storage is not None:
            grown[:, :, :old_rows, :, :old_capacity] = storage
            self._dirty += [0] * (rows - old_rows)
        else:
            self._owners.clear()
            self._dirty = [0] * rows
        self._storage = grown
        return True

    def _refill(self, cache: PagedKVCache, fills: list[tuple[int, int, tuple[int, ...]]]) -> None:
        """Copies positions [0, p) of each (row, p, block table) from the pool, for every layer, and zeroes
        the rest of the row that earlier occupants wrote. One index_select for all refilled rows."""
        if not fills:
            return
        self.rows_refilled += len(fills)
        bs = cache.layout.block_size
        counts = [-(-position // bs) for _, position, _ in fills]
        blocks = [block for (_, _, table), count in zip(fills, counts) for block in table[:count]]
        index = torch.tensor(blocks, dtype=torch.long, device=cache.data.device)
        # Selected from a [layers, 2, kvh, blocks, bs, hd] view of the pool, so it comes out in the rows' layout.
        gathered = cache.data.permute(0, 2, 4, 1, 3, 5).index_select(3, index).flatten(3, 4)
        storage, begin = self._storage, 0
        for (row, position, _), count in zip(fills, counts):
            storage[:, :, row, :, :position] = gathered[:, :, :, begin : begin + position]
            if self._dirty[row] > position:
                storage[:, :, row, :, position : self._dirty[row]] = 0
            self._dirty[row] = position
            begin += count * bs
