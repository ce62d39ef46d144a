"""Tests of the block allocator and the chained block hash (pure bookkeeping, no tensors)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine.block_manager import (
    ROOT_PARENT_HASH,
    BlockAllocator,
    KVEvent,
    KVEventKind,
    compute_block_hashes,
    hash_block_tokens,
)
from engine.errors import NoFreeBlocksError

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- hashing ------------------------------------------------------------------------------------

HASH_CASES = [
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, None),
    (list(range(40)), 16, None),
    ([0, 2**32 - 1, 7, 7], 2, 12345),
    ([5] * 33, 16, 2**64 - 1),
]


def test_hashes_identical_in_another_process():
    expected = [compute_block_hashes(tokens, size, parent) for tokens, size, parent in HASH_CASES]
    expected.append([hash_block_tokens(None, [3, 1, 4]), hash_block_tokens(99, [])])
    script = (
        "import json, sys\n"
        "from engine.block_manager import compute_block_hashes, hash_block_tokens\n"
        "cases = json.loads(sys.argv[1])\n"
        "out = [compute_block_hashes(t, s, p) for t, s, p in cases]\n"
        "out.append([hash_block_tokens(None, [3, 1, 4]), hash_block_tokens(99, [])])\n"
        "print(json.dumps(out))\n"
    )
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(HASH_CASES)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(result.stdout) == expected


def test_hash_follows_the_documented_byte_layout():
    # The router may reimplement this; the layout in the docstring is the contract.
    tokens = [1, 70000, 2**32 - 1]
    root = struct.pack("<Q", ROOT_PARENT_HASH) + struct.pack("<3I", *tokens)
    assert hash_block_tokens(None, tokens) == xxhash.xxh3_64_intdigest(root)
    chained = struct.pack("<Q", 2**63 + 5) + struct.pack("<3I", *tokens)
    assert hash_block_tokens(2**63 + 5, tokens) == xxhash.xxh3_64_intdigest(chained)


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), min_size=12, max_size=12),
    index=st.integers(0, 11),
    delta=st.integers(1, 2**32 - 1),
)
def test_changing_a_token_changes_its_block_and_every_later_hash(tokens, index, delta):
    changed = list(tokens)
    changed[index] = (changed[index] + delta) % 2**32
    before, after = compute_block_hashes(tokens, 3), compute_block_hashes(changed, 3)
    block = index // 3
    assert before[:block] == after[:block]
    assert all(b != a for b, a in zip(before[block:], after[block:]))


def test_same_block_under_different_parents_differs():
    block = [7, 8, 9, 10]
    assert hash_block_tokens(None, block) != hash_block_tokens(1, block)
    assert hash_block_tokens(1, block) != hash_block_tokens(2, block)
    first, second = compute_block_hashes([1, 2, 3, 4] + block, 4)
    assert second != compute_block_hashes([4, 3, 2, 1] + block, 4)[1]
    assert second == hash_block_tokens(first, block)


@given(tokens=st.lists(st.integers(0, 1000), max_size=40), block_size=st.integers(1, 8))
def test_partial_trailing_block_has_no_hash(tokens, block_size):
    num_full = len(tokens) // block_size
    hashes = compute_block_hashes(tokens, block_size)
    assert len(hashes) == num_full
    assert hashes == compute_block_hashes(tokens[: num_full * block_size], block_size)
    assert compute_block_hashes(tokens + [1] * (block_size - 1), block_size)[:num_full] == hashes


@given(head=st.lists(st.integers(0, 9), max_size=12), tail=st.lists(st.integers(0, 9), max_size=12))
def test_parent_hash_continues_a_chain(head, tail):
    head = head[: len(head) // 4 * 4]
    head_hashes = compute_block_hashes(head, 4)
    parent = head_hashes[-1] if head_hashes else None
    assert compute_block_hashes(head + tail, 4) == head_hashes + compute_block_hashes(tail, 4, parent)


def test_out_of_range_tokens_and_parents_are_rejected():
    with pytest.raises(ValueError):
        hash_block_tokens(None, [-1])
    with pytest.raises(ValueError):
        compute_block_hashes([2**32, 0], 2)
    with pytest.raises(ValueError):
        hash_block_tokens(2**64, [1])


# -- allocator: references and failures ---------------------------------------------------------


def snapshot(alloc: BlockAllocator) -> tuple:
    ids = range(alloc.num_blocks)
    return (
        [alloc.ref_count(b) for b in ids],
        [alloc.block_hash(b) for b in ids],
        alloc.num_free_blocks,
        alloc.num_cached_blocks,
    )


def test_allocate_acquire_free_reference_counts():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    blocks = alloc.allocate(3)
    assert len(set(blocks)) == 3 and all(alloc.ref_count(b) == 1 for b in blocks)
    assert (alloc.num_used_blocks, alloc.num_free_blocks) == (3, 1)
    alloc.acquire(blocks[:1])
    assert alloc.ref_count(blocks[0]) == 2
    alloc.free(blocks)
    assert [alloc.ref_count(b) for b in blocks] == [1, 0, 0]
    assert (alloc.num_used_blocks, alloc.num_free_blocks) == (1, 3)
    alloc.free(blocks[:1])
    assert (alloc.num_used_blocks, alloc.num_free_blocks) == (0, 4)
    with pytest.raises(ValueError):
        alloc.free(blocks[:1])


def test_free_that_would_go_negative_changes_nothing():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    held = alloc.allocate(1)
    before = snapshot(alloc)
    with pytest.raises(ValueError):
        alloc.free(held + held)
    free_block = next(b for b in range(4) if b not in held)
    with pytest.raises(ValueError):
        alloc.free(held + [free_block])
    assert snapshot(alloc) == before


def test_no_free_blocks_leaves_state_unchanged():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    cached = alloc.allocate(2)
    alloc.adopt(cached, [11, 22])
    alloc.free(cached)
    alloc.allocate(1)
    alloc.take_events()
    before = snapshot(alloc)
    assert not alloc.can_allocate(4)
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate(4)
    assert snapshot(alloc) == before
    assert alloc.take_events() == []
    assert alloc.match_prefix([11, 22]) == cached


def test_acquire_of_a_free_uncached_block_is_refused():
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    with pytest.raises(ValueError):
        alloc.acquire([0])
    with pytest.raises(ValueError):
        alloc.acquire([5])
    assert alloc.num_free_blocks == 2


# -- allocator: prefix cache --------------------------------------------------------------------


def test_prefix_hit_via_match_prefix_and_acquire():
    alloc = BlockAllocator(num_blocks=8, block_size=2)
    first = compute_block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    blocks = alloc.allocate(4)
    for block_id, block_hash in zip(blocks, first):
        assert alloc.publish(block_id, block_hash)
    alloc.free(blocks)

    second = compute_block_hashes([1, 2, 3, 4, 9, 9, 7], 2)
    hits = alloc.match_prefix(second)
    assert hits == blocks[:2]
    assert alloc.num_free_blocks == 8  # match_prefix changes nothing
    alloc.acquire(hits)
    assert alloc.num_free_blocks == 6 and all(alloc.ref_count(b) == 1 for b in hits)
    fresh = alloc.allocate(6)
    assert not set(fresh) & set(hits)
    assert alloc.match_prefix(second) == hits


def test_cached_blocks_are_reused_by_a_second_sequence():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    prompt = list(range(12))
    hashes = compute_block_hashes(prompt, 4)
    first = alloc.allocate(3)
    alloc.adopt(first, hashes)
    alloc.free(first)
    hits = alloc.match_prefix(hashes)
    alloc.acquire(hits)
    assert hits == first
    assert alloc.num_used_blocks == 3 and alloc.num_cached_blocks == 3


def test_lru_evicts_least_recently_freed_and_tail_first():
    alloc = BlockAllocator(num_blocks=4, block_size=1)
    seq_a, seq_b = alloc.allocate(2), alloc.allocate(2)
    alloc.adopt(seq_a, [1, 2])
    alloc.adopt(seq_b, [3, 4])
    alloc.free(seq_a)  # freed first: evicted first, its tail (hash 2) before its head
    alloc.free(seq_b)
    alloc.take_events()
    evicted = [alloc.block_hash(b) for b in range(4)]
    order = [alloc.allocate(1)[0] for _ in range(4)]
    assert [evicted[b] for b in order] == [2, 1, 4, 3]
    assert [e.block_hashes for e in alloc.take_events()] == [(2,), (1,), (4,), (3,)]


def test_never_cached_free_blocks_are_used_before_cached_ones():
    alloc = BlockAllocator(num_blocks=5, block_size=1)
    blocks = alloc.allocate(4)
    assert alloc.publish(blocks[1], 100)
    assert alloc.publish(blocks[2], 200)
    alloc.free(blocks)  # unpublished blocks 0 and 3 go to the front, ahead of the never-used one
    alloc.take_events()
    uncached = set(alloc.allocate(3))
    assert uncached == {blocks[0], blocks[3], 4}
    assert alloc.take_events() == []
    assert alloc.num_cached_blocks == 2
    assert alloc.allocate(1) == [blocks[2]]  # freed before blocks[1]: reverse order within free()
    assert [e.kind for e in alloc.take_events()] == [KVEventKind.REMOVED]


def test_allocate_many_evicts_with_one_removed_event():
    alloc = BlockAllocator(num_blocks=3, block_size=1)
    blocks = alloc.allocate(3)
    alloc.adopt(blocks, [7, 8, 9])
    alloc.free(blocks)
    alloc.take_events()
    alloc.allocate(3)
    (event,) = alloc.take_events()
    assert event.kind is KVEventKind.REMOVED and sorted(event.block_hashes) == [7, 8, 9]
    assert alloc.num_cached_blocks == 0 and alloc.match_prefix([7]) == []


def test_publish_duplicate_hash_returns_false_and_stays_unpublished():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    a, b = alloc.allocate(2)
    assert alloc.publish(a, 42)
    alloc.take_events()
    assert not alloc.publish(b, 42)
    assert alloc.block_hash(b) is None and alloc.match_prefix([42]) == [a]
    assert not alloc.publish(a, 42)  # already published under that hash: no-op
    assert alloc.take_events() == []
    with pytest.raises(ValueError):
        alloc.publish(a, 43)
    alloc.free([b])
    assert alloc.allocate(1) == [b]  # an unpublished freed block is reused first


def test_publish_requires_a_held_block():
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    with pytest.raises(ValueError):
        alloc.publish(0, 1)
    assert alloc.num_cached_blocks == 0


def test_adopt_publishes_with_one_event():
    alloc = BlockAllocator(num_blocks=6, block_size=2)
    existing = alloc.allocate(1)
    alloc.publish(existing[0], 5)
    alloc.take_events()
    received = alloc.allocate(3)
    alloc.adopt(received, [4, 5, 6])  # 5 is already cached elsewhere: that block stays unpublished
    assert alloc.take_events() == [KVEvent(2, KVEventKind.STORED, (4, 6))]
    assert alloc.match_prefix([4]) == [received[0]]
    assert alloc.match_prefix([5, 6]) == [existing[0], received[2]]
    assert alloc.block_hash(received[1]) is None
    with pytest.raises(ValueError):
        alloc.adopt(received[:1], [1, 2])


def test_adopt_validates_everything_before_publishing():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    held = alloc.allocate(1)
    free_block = next(b for b in range(4) if b not in held)
    with pytest.raises(ValueError):
        alloc.adopt(held + [free_block], [1, 2])
    assert alloc.num_cached_blocks == 0 and alloc.take_events() == []


def test_events_have_strictly_increasing_ids_and_are_drained():
    alloc = BlockAllocator(num_blocks=2, block_size=1)
    blocks = alloc.allocate(2)
    alloc.publish(blocks[0], 1)
    alloc.publish(blocks[1], 2)
    first = alloc.take_events()
    alloc.free(blocks)
    alloc.allocate(1)
    alloc.reset_prefix_cache()
    second = alloc.take_events()
    ids = [e.event_id for e in first + second]
    assert ids == list(range(1, len(ids) + 1))
    assert [e.kind for e in first + second] == [
        KVEventKind.STORED,
        KVEventKind.STORED,
        KVEventKind.REMOVED,
        KVEventKind.CLEARED,
    ]
    assert second[-1].block_hashes == ()
    assert alloc.take_events() == []


def test_reset_prefix_cache_unpublishes_everything():
    alloc = BlockAllocator(num_blocks=4, block_size=1)
    held, freed = alloc.allocate(1), alloc.allocate(1)
    alloc.adopt(held + freed, [1, 2])
    alloc.free(freed)
    alloc.reset_prefix_cache()
    assert alloc.num_cached_blocks == 0 and alloc.match_prefix([1]) == [] and alloc.match_prefix([2]) == []
    assert alloc.block_hash(held[0]) is None and alloc.ref_count(held[0]) == 1
    alloc.take_events()
    alloc.allocate(3)
    assert alloc.take_events() == []  # nothing left to evict
    assert alloc.publish(held[0], 1)  # a held block may be published again after a reset


def test_disabled_prefix_cache_never_caches():
    alloc = BlockAllocator(num_blocks=4, block_size=2, enable_prefix_cache=False)
    blocks = alloc.allocate(3)
    assert not alloc.publish(blocks[0], 1)
    alloc.adopt(blocks[1:], [2, 3])
    assert alloc.num_cached_blocks == 0 and alloc.match_prefix([1, 2, 3]) == []
    alloc.free(blocks)
    alloc.reset_prefix_cache()
    assert alloc.take_events() == []
    with pytest.raises(ValueError):
        alloc.acquire(blocks[:1])


# -- allocator: stateful model ------------------------------------------------------------------

BLOCK_SIZE = 2
NUM_BLOCKS = 8
_reuse = Counter()  # across the whole hypothesis run; asserted after it


@dataclass
class _Sequence:
    tokens: list[int]
    blocks: list[int]
    num_computed_blocks: int  # leading full blocks whose KV exists (prefix hits included)
    hashes: list[int] = field(default_factory=list)

    @property
    def is_computed(self) -> bool:
        return self.num_computed_blocks == len(self.hashes)


class AllocatorMachine(RuleBasedStateMachine):
    """Sequences come and go over a small pool and a two-token alphabet so prefixes collide.

    ``contents[b]`` is the hash of the KV the model last wrote into block b (None: garbage), so a
    prefix hit on a block that was since reallocated shows up as a contents mismatch.
    """

    enable_prefix_cache = True

    def __init__(self):
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, self.enable_prefix_cache)
        self.seqs: dict[int, _Sequence] = {}
        self.next_seq_id = 0
        self.contents: dict[int, int | None] = {}
        self.router_view: set[int] = set()  # cached hashes as a router rebuilds them from events
        self.last_event_id = 0

    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=9))
    def add(self, tokens):
        hashes = compute_block_hashes(tokens, BLOCK_SIZE)
        hits = self.alloc.match_prefix(hashes)
        assert [self.contents[b] for b in hits] == hashes[: len(hits)]
        longest_run = next((i for i, h in enumerate(hashes) if h not in self.router_view), len(hashes))
        assert len(hits) == longest_run
        self.alloc.acquire(hits)
        new = self._allocate(-(-len(tokens) // BLOCK_SIZE) - len(hits))
        if new is None:
            self.alloc.free(hits)
            return
        _reuse["hit_blocks"] += len(hits)
        self.seqs[self.next_seq_id] = _Sequence(tokens, hits + new, len(hits), hashes)
        self.next_seq_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), use_adopt=st.booleans())
    def compute(self, data, use_adopt):
        """Write the KV of every full, not yet computed block, then publish it."""
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        todo = range(seq.num_computed_blocks, len(seq.hashes))
        block_ids, hashes = [seq.blocks[i] for i in todo], [seq.hashes[i] for i in todo]
        for block_id, block_hash in zip(block_ids, hashes):
            self.contents[block_id] = block_hash
        if use_adopt:
            self.alloc.adopt(block_ids, hashes)
        else:
            for block_id, block_hash in zip(block_ids, hashes):
                already_cached = bool(self.alloc.match_prefix([block_hash]))
                expected = self.enable_prefix_cache and not already_cached
                assert self.alloc.publish(block_id, block_hash) == expected
        seq.num_computed_blocks = len(seq.hashes)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 1), min_size=1, max_size=3))
    def grow(self, data, extra):
        """Decode appends tokens; the last block fills up and new blocks are allocated."""
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        tokens = seq.tokens + extra
        new = self._allocate(-(-len(tokens) // BLOCK_SIZE) - len(seq.blocks))
        if new is not None:
            seq.tokens, seq.blocks = tokens, seq.blocks + new
            seq.hashes = compute_block_hashes(tokens, BLOCK_SIZE)

    @precondition(lambda self: any(s.is_computed for s in self.seqs.values()))
    @rule(data=st.data())
    def finish(self, data):
        seq_id = data.draw(st.sampled_from(sorted(i for i, s in self.seqs.items() if s.is_computed)))
        self.alloc.free(self.seqs.pop(seq_id).blocks)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def abort(self, data):
        self.alloc.free(self.seqs.pop(data.draw(st.sampled_from(sorted(self.seqs)))).blocks)

    @rule()
    def preempt_all(self):
        self._free_everything()

    @rule(roll=st.integers(0, 9))
    def reset_prefix_cache(self, roll):
        if roll == 0:  # rarely, so that the cache has time to be reused
            self.alloc.reset_prefix_cache()

    def _allocate(self, num_blocks: int) -> list[int] | None:
        before = snapshot(self.alloc)
        assert self.alloc.can_allocate(num_blocks) == (num_blocks <= self.alloc.num_free_blocks)
        try:
            new = self.alloc.allocate(num_blocks)
        except NoFreeBlocksError:
            assert num_blocks > before[2] and snapshot(self.alloc) == before
            return None
        for block_id in new:
            self.contents[block_id] = None
        return new

    def _free_everything(self):
        for seq_id in sorted(self.seqs):
            self.alloc.free(self.seqs.pop(seq_id).blocks)
        assert self.alloc.num_used_blocks == 0 and self.alloc.num_free_blocks == NUM_BLOCKS

    @invariant()
    def ref_counts_equal_live_holders(self):
        holders = Counter(b for seq in self.seqs.values() for b in seq.blocks)
        assert [self.alloc.ref_count(b) for b in range(NUM_BLOCKS)] == [holders[b] for b in range(NUM_BLOCKS)]
        assert self.alloc.num_used_blocks == len(holders)
        assert self.alloc.num_used_blocks + self.alloc.num_free_blocks == NUM_BLOCKS

    @invariant()
    def cached_hashes_map_to_blocks_holding_them(self):
        hashes = {b: self.alloc.block_hash(b) for b in range(NUM_BLOCKS)}
        cached = {b: h for b, h in hashes.items() if h is not None}
        for block_id, block_hash in cached.items():
            assert self.alloc.match_prefix([block_hash]) == [block_id]
            assert self.contents[block_id] == block_hash
        assert self.alloc.num_cached_blocks == len(cached)
        assert self.enable_prefix_cache or not cached

    @invariant()
    def events_rebuild_the_cache(self):
        for event in self.alloc.take_events():
            assert event.event_id == self.last_event_id + 1
            self.last_event_id = event.event_id
            if event.kind is KVEventKind.STORED:
                assert not self.router_view & set(event.block_hashes)
                self.router_view |= set(event.block_hashes)
            elif event.kind is KVEventKind.REMOVED:
                assert set(event.block_hashes) <= self.router_view
                self.router_view -= set(event.block_hashes)
            else:
                self.router_view.clear()
        cached = {self.alloc.block_hash(b) for b in range(NUM_BLOCKS)} - {None}
        assert self.router_view == cached

    def teardown(self):
        self._free_everything()


class DisabledCacheMachine(AllocatorMachine):
    enable_prefix_cache = False


STATEFUL_SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_allocator_state_machine():
    _reuse.clear()
    run_state_machine_as_test(AllocatorMachine, settings=STATEFUL_SETTINGS)
    assert _reuse["hit_blocks"] > 0, "no run ever reused a cached block"


def test_allocator_state_machine_without_prefix_cache():
    _reuse.clear()
    run_state_machine_as_test(DisabledCacheMachine, settings=settings(STATEFUL_SETTINGS, max_examples=50))
    assert _reuse["hit_blocks"] == 0
