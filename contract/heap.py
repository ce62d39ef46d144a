"""What a serving process does with its heap once it is up: its startup objects (modules, the model,
the tokenizer, the app) live as long as it does, so the cyclic garbage collector stops walking them.

Without this, every full collection of a worker or router walks every object made at startup: a few
hundred thousand, 20-70 ms in which the process runs no Python (an engine step, a token, a request's
routing all wait) — once every few tens of seconds under load. Frozen, a full collection walks only
what was made since. Objects stay freed by their reference counts as ever; only cycles among the
frozen ones are never collected, and the collection before the freeze clears those made so far."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then move every object tracked so far out of the collector's reach; how many were
    frozen in all. Called by a serving process once it serves (the worker and router entry points)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
