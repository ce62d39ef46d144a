"""Each request's priority in the engine (vLLM's, lower first): the waiting queue is ordered by it, then by arrival,
and a request short of blocks preempts the running request of the highest priority value (the most recently
admitted among equals), where it preempted the most recently admitted whatever its priority. Neither changes a
request's greedy output."""

from __future__ import annotations

from contract.sampling import SamplingParams
from engine.engine import Engine
from tests.engine.test_engine import (  # noqa: F401  (model_dir: a fixture)
    GREEDY,
    _engine,
    _prompts,
    model_dir,
    recorded_preemptions,
)


def _run(engine: Engine, until=lambda: False) -> tuple[list[str], dict[str, list[int]]]:
    """Steps to the end (or until ``until()``): the order in which requests gave their first token, and each one's
    tokens."""
    first, tokens = [], {}
    while engine.has_unfinished() and not until():
        for output in engine.step():
            if output.request_id not in tokens:
                first.append(output.request_id)
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
    return first, tokens


def test_the_waiting_queue_is_ordered_by_priority_then_arrival(model_dir):  # noqa: F811
    prompts = _prompts(5, seed=21)
    plain = [list(c.token_ids) for c in _engine(model_dir).generate(prompts, GREEDY)]
    engine = _engine(model_dir, max_num_seqs=1)  # one at a time: the queue's order is the order of service
    priorities = [0, 5, -5, 5, 0]
    for index, (prompt, priority) in enumerate(zip(prompts, priorities)):
        engine.add_request(f"r{index}", prompt, GREEDY, priority=priority)
    first, tokens = _run(engine)
    assert first == ["r2", "r0", "r4", "r1", "r3"]
    assert [tokens[f"r{index}"] for index in range(5)] == plain


def test_equal_priorities_are_served_first_come_first_served(model_dir):  # noqa: F811
    engine = _engine(model_dir, max_num_seqs=1)
    for index, prompt in enumerate(_prompts(4, seed=22)):
        engine.add_request(f"r{index}", prompt, GREEDY, priority=3)
    assert _run(engine)[0] == ["r0", "r1", "r2", "r3"]


def test_a_request_short_of_blocks_preempts_the_lowest_priority_first(model_dir):  # noqa: F811
    """Two long decodes in a pool too small for both: the one admitted first has the higher priority value, so it
    is the one preempted (by arrival alone it would have been the other), even once scheduled in the step, and it
    waits at the head of its priority, ahead of a later request of the same priority."""
    # "high" is 6 tokens longer: it needs its next block in a step where "low" was scheduled before it, so the
    # victim gives back a chunk already planned.
    prompts = [_prompts(1, seed=23 + i, low=length, high=length)[0] for i, length in enumerate((40, 46, 40))]
    longer = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    plain = [list(c.token_ids) for c in _engine(model_dir).generate(prompts, longer)]
    engine = _engine(model_dir, num_kv_blocks=10, enable_prefix_cache=False, max_num_seqs=2)
    preempted = recorded_preemptions(engine)
    engine.add_request("low", prompts[0], longer, priority=1)
    start_first, start = _run(engine, until=lambda: bool(engine.scheduler.running))  # "low" admitted first
    engine.add_request("high", prompts[1], longer, priority=0)
    engine.add_request("later", prompts[2], longer, priority=1)  # waits: two run at once
    first, tokens = _run(engine, until=lambda: bool(preempted))
    assert start_first == ["low"] and first[0] == "high"
    assert preempted == ["low"], "by arrival alone, the one admitted last ('high') would have been preempted"
    # Preempted, "low" waits ahead of "later" (same priority, later arrival).
    assert [r.request_id for r in engine.scheduler.waiting] == ["low", "later"]
    _, rest = _run(engine)
    assert "high" not in preempted, preempted  # later, "low" and "later" (equal) contend: the latest goes
    outputs = [start.get(r, []) + tokens.get(r, []) + rest.get(r, []) for r in ("low", "high", "later")]
    assert outputs == plain
    assert engine.allocator.num_used_blocks == 0
