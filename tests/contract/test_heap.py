"""A serving process freezes its startup heap (contract/heap.py): a later full collection walks only
what was made since, and garbage cycles made at startup are collected first, not frozen. Run in a
fresh interpreter: freezing the test process's own heap would outlive this test."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import gc, json, weakref
    import router.openai_api  # a serving process's startup: a large heap of modules and objects

    class Node:
        pass

    startup = [Node() for _ in range(1000)]
    cycle = Node()
    cycle.self = cycle  # garbage made at startup: only the collector can free it
    freed = []
    weakref.finalize(cycle, freed.append, True)
    del cycle
    tracked = len(gc.get_objects())

    from contract.heap import freeze_startup_heap
    frozen = freeze_startup_heap()
    later = [Node() for _ in range(10)]
    walked = {id(o) for o in gc.get_objects()}
    print(json.dumps({
        "tracked": tracked,
        "frozen": frozen,
        "walked": len(walked),
        "startup_walked": sum(id(o) in walked for o in startup),
        "later_walked": sum(id(o) in walked for o in later),
        "cycle_freed": freed == [True],
    }))
    """
)


def test_the_startup_heap_is_frozen_and_its_garbage_collected_first():
    import json

    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["cycle_freed"], "a garbage cycle made before the freeze was frozen instead of collected"
    assert seen["frozen"] >= seen["tracked"] * 0.9, seen
    assert seen["startup_walked"] == 0, seen
    assert seen["later_walked"] == 10, seen
    assert seen["walked"] < seen["tracked"] / 20, seen
