"""When a layer's K/V is in the pool: the ordering contract between compute and KV transfer.

The model runner runs layer after layer on the compute stream and, after each layer, hands the
``on_layer_done`` hook a ``LayerReady`` recorded behind that layer's K/V writes::

    compute stream:  [layer 0 ... K/V write ... ] (rec e0) [layer 1 ...] (rec e1) [layer 2 ...]
    sender thread:                    e0.synchronize() -> read/WRITE layer 0
    side stream:                      wait(e1) -> copy layer 1 out

- **Who records**: the engine (``record_layer_ready``), on the compute stream, right after the
  layer; on CPU the work is already done when the hook runs, so it hands ``COMPLETED``.
- **Who waits**: whoever reads the layer's regions of the pool — a KV transport — and only on
  its own thread (``synchronize``) or on a side stream (``torch.cuda.Stream.wait_event``).
  Nothing waits on the compute stream or on the engine thread: the next layer computes while
  the previous one is in flight. ``query`` tells a caller whether reading now would be safe.
- **Lifetime**: the regions stay valid until the engine reuses their blocks; a transport that
  reads after ``push_layer`` returned says so with ``reads_after_push`` and the block holds
  follow (see kv_transfer/sender.py).
"""

from __future__ import annotations

from typing import Protocol

import torch


class LayerReady(Protocol):
    """The subset of ``torch.cuda.Event`` the contract uses."""

    def query(self) -> bool:
        """True once every write recorded before the event has finished; never blocks."""
        ...

    def synchronize(self) -> None:
        """Blocks the calling thread until ``query()`` would be True."""
        ...

    def wait(self, stream=None) -> None:
        """Makes ``stream``'s later work wait until ``query()`` would be True (``Stream.wait_event`` calls it)."""
        ...


class _Completed:
    """CPU stand-in: the writes ran synchronously before the hook was called."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def wait(self, stream=None) -> None:
        return None  # nothing to wait for: a side stream may copy at once

    def __repr__(self) -> str:
        return "COMPLETED"


COMPLETED: LayerReady = _Completed()


def record_layer_ready(device: torch.device) -> LayerReady:
    """A ``LayerReady`` behind everything queued so far on ``device``'s current stream."""
    if device.type != "cuda":
        return COMPLETED
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
