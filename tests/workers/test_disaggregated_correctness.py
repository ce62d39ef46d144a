"""Greedy fp32 through prefill worker → KV transfer → decode worker equals transformers, token for token."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.checkpoints import hf_greedy
from tests.workers.conftest import random_prompt
from tests.workers.harness import aggregated, disaggregated, new_id, run_disaggregated, wait_idle, wire_params

MAX_TOKENS = 10


def test_batch_matches_transformers_and_aggregated(cluster, checkpoints, rng):
    # 1 token, inside one block, exact multiples of the 16-token block, one past, and many blocks.
    lengths = [1, 7, 16, 17, 32, 48, 63, 100, 160, 257]
    prompts = [random_prompt(rng, n) for n in lengths]
    expected = [hf_greedy(checkpoints.tiny_model, p, MAX_TOKENS) for p in prompts]
    params = wire_params(MAX_TOKENS)

    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent, so P and D batch them
        results = list(
            pool.map(lambda p: disaggregated(cluster.prefill, cluster.decode, new_id("batch"), p, params)[0], prompts)
        )
    for length, got, want in zip(lengths, results, expected):
        assert got == want, f"disaggregated output differs from transformers for a {length}-token prompt"

    for length, prompt, want in zip(lengths, prompts, expected):
        assert aggregated(cluster.decode, new_id("agg"), prompt, params) == want, (
            f"aggregated path differs for {length} tokens"
        )
    wait_idle(cluster.prefill)
    wait_idle(cluster.decode)


def test_concurrent_requests_with_shared_prefixes(cluster, checkpoints, rng):
    shared = random_prompt(rng, 200)  # 12.5 blocks: reuse covers 12 full blocks
    prompts = []
    for i in range(16):
        if i % 3 == 0:
            prompts.append(shared + random_prompt(rng, rng.randrange(5, 100)))
        else:
            prompts.append(random_prompt(rng, rng.randrange(5, 301)))
    prompts[15] = list(prompts[3])  # an exact repeat inside the burst
    expected = [hf_greedy(checkpoints.tiny_model, p, 8) for p in prompts]
    params = wire_params(8)
    p_before, d_before = cluster.prefill.stats(), cluster.decode.stats()

    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda p: disaggregated(cluster.prefill, cluster.decode, new_id("burst"), p, params)[0], prompts)
        )
    for i, (got, want) in enumerate(zip(results, expected)):
        assert got == want, f"request {i} ({len(prompts[i])} tokens) differs from transformers"

    # Once the burst is done, a repeated prompt is served from both prefix caches.
    repeat = run_disaggregated(cluster.prefill, cluster.decode, new_id("repeat"), prompts[3], params)
    assert repeat.tokens == expected[3]
    full_blocks = len(prompts[3]) // 16 * 16
    assert repeat.ticket.num_cached_tokens == full_blocks, "decode worker did not reuse its cached prefix"
    assert repeat.prefill.num_cached_tokens > 0, "prefill worker did not reuse its cached prefix"
    assert repeat.last.finish_reason == "length"
    assert repeat.last.usage.prompt_tokens == len(prompts[3])
    assert repeat.last.usage.completion_tokens == 8
    assert repeat.last.usage.cached_tokens > 0, "usage does not report the decode worker's cached tokens"

    p_after, d_after = wait_idle(cluster.prefill), wait_idle(cluster.decode)
    assert p_after.prefix_hit_tokens > p_before.prefix_hit_tokens
    assert d_after.prefix_hit_tokens >= d_before.prefix_hit_tokens + full_blocks
    assert p_after.prompt_tokens - p_before.prompt_tokens == sum(map(len, prompts)) + len(prompts[3])
