"""What the forkserver of ``tests/workers/forked.py`` imports before it forks any worker: every module a worker's
start would import. Importing them must leave the server with one thread (a fork copies only the thread that forks,
and a lock another thread held stays held in the child): this module fails the server otherwise."""

import os

import cluster.cli  # noqa: F401
import decode_worker.worker  # noqa: F401
import kv_transfer.bulk_transport  # noqa: F401
import kv_transfer.nixl_transport  # noqa: F401
import prefill_worker.worker  # noqa: F401

_threads = os.listdir("/proc/self/task")
if len(_threads) != 1:
    raise RuntimeError(f"the worker forkserver has {len(_threads)} threads after its imports; it must fork from one")
