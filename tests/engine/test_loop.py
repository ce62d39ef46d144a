"""The engine loop sleeps while its engine has nothing to run — nothing unfinished, or only requests waiting for KV a
peer computes (a decode worker's reservations) — and wakes for the call that changes that. Stepping such an engine
again at once would spin, holding the GIL from the threads that land the KV (NIXL's notification poller, the gRPC
and bulk TCP receivers): each of their wake-ups would wait out the interpreter's switch interval."""

from __future__ import annotations

import glob
import os
import statistics
import sys
import threading
import time

import pytest

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineError
from engine.loop import EngineLoop
from engine.request import RequestState
from tests.engine.test_failure_isolation import model_dir  # noqa: F401 (fixture)

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _short_sleeps(count: int = 100) -> list[float]:
    """What 0.1 ms sleeps take on this thread, as a transport thread's polls do."""
    took = []
    for _ in range(count):
        start = time.perf_counter()
        time.sleep(0.0001)
        took.append(time.perf_counter() - start)
    return took


def test_a_reservation_waiting_for_its_kv_leaves_the_loop_asleep_until_its_commit(model_dir):  # noqa: F811
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64))
    loop = EngineLoop(engine).start()
    try:
        loop.call(lambda e: e.reserve("r", list(range(3, 40)), PARAMS))
        assert loop.call(lambda e: e.requests["r"].state) is RequestState.WAITING_FOR_KV
        cpu, wall = time.process_time(), time.perf_counter()
        sleeps = _short_sleeps()
        time.sleep(0.3)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall

        assert statistics.median(sleeps) < sys.getswitchinterval() / 2, "another thread waited for the GIL"
        assert cpu < 0.3 * wall, f"the loop kept a core busy: {cpu:.2f} s of CPU in {wall:.2f} s"

        # The commit (a call, as the decode worker makes it) wakes the loop; the request then decodes to its end.
        stream = loop.call(lambda e: loop.watch("r"))  # watch is the loop thread's (its contract)
        loop.call(lambda e: e.complete_reservation("r", first_token_id=5))
        tokens = [t for output in stream for t in output.token_ids]
        assert len(tokens) == PARAMS.max_tokens
    finally:
        loop.stop()


def test_an_adopted_requests_first_token_goes_out_before_the_step_it_then_decodes_in(model_dir):  # noqa: F811
    """The first token came with the KV: it reaches the stream as soon as the commit is adopted, not at the end of
    the next step, which on a busy decode worker may be long (here: held until the test lets it run)."""
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64))
    gate, execute = threading.Event(), engine.runner.execute

    def held(*args, **kwargs):
        assert gate.wait(30), "the step was never let run"
        return execute(*args, **kwargs)

    engine.runner.execute = held
    loop = EngineLoop(engine).start()
    try:
        loop.call(lambda e: e.reserve("r", list(range(3, 40)), PARAMS))
        stream = loop.call(lambda e: loop.watch("r"))
        loop.call(lambda e: e.complete_reservation("r", first_token_id=5))
        first = stream.get(timeout=10)  # the step the request decodes in is held meanwhile
        assert first.token_ids == (5,) and not first.finished
        gate.set()
        tokens = [5] + [t for output in stream for t in output.token_ids]
        assert len(tokens) == PARAMS.max_tokens
    finally:
        gate.set()
        loop.stop()


def test_the_engine_thread_carries_its_name_in_the_os(model_dir):  # noqa: F811
    """``top -H``, py-spy and ``bench compare``'s engine-cores column find the engine thread by its OS name. The
    name is this test's own: an in-process worker of an earlier test may leave a ``decode-engine`` task listed for a
    moment after its thread's join."""
    loop = EngineLoop(Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64)), name="named-engine")
    loop.start()
    try:
        loop.call(lambda e: None)  # the loop thread is running
        names = []
        for task in glob.glob(f"/proc/{os.getpid()}/task/*/comm"):
            with open(task) as handle:
                names.append(handle.read().strip())
        assert names.count("named-engine") == 1, names
    finally:
        loop.stop()


def test_a_posted_call_that_fails_is_logged_by_name_and_the_loop_serves_on(model_dir, caplog):  # noqa: F811
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64))
    loop = EngineLoop(engine).start()

    def broken(engine: Engine) -> None:
        raise KeyError("no such request")

    try:
        with caplog.at_level("ERROR", logger="engine.loop"):
            loop.post(broken, "stopping r-7")
            loop.post(lambda e: None, "a call that works")
            assert loop.call(lambda e: e.has_unfinished()) is False  # served after the failed one
        failures = [r for r in caplog.records if r.name == "engine.loop"]
        assert [r.getMessage() for r in failures] == ["stopping r-7 failed on the engine thread"]
        assert isinstance(failures[0].exc_info[1], KeyError)
    finally:
        loop.stop()


def test_a_call_returns_once_the_after_call_hook_has_seen_what_it_did(model_dir):  # noqa: F811
    """A worker's Stats answer from the snapshot its hooks take: one taken after each call, before the caller has
    the result, is what lets a Reserve's blocks show in the Stats asked for next (after the next step only, they
    did not yet when that step was slow to come)."""
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64))
    seen: list[tuple[int, int]] = []
    loop = EngineLoop(engine, after_call=lambda e: seen.append((e.stats().blocks_used, e.stats().waiting_for_kv)))
    loop.start()
    try:
        loop.call(lambda e: e.reserve("r", list(range(3, 40)), PARAMS))  # 37 tokens: 3 blocks of 16
        assert seen[-1] == (3, 1)
        with pytest.raises(EngineError, match="already"):  # the same id again: refused; the hook runs all the same
            loop.call(lambda e: e.reserve("r", list(range(3, 40)), PARAMS))
        assert len(seen) == 2 and seen[-1] == (3, 1)
    finally:
        loop.stop()
