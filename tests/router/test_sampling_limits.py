"""Sampling limits checked once, in the sampling record, for both public APIs (min_tokens above max_tokens is
refused by name over HTTP and gRPC alike); and seeds over a prompt list: each prompt's choices are seeded from the
request's seed by their index within that prompt, so a prompt's text does not depend on its place in the list."""

from __future__ import annotations

import grpc

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from tests.router.conftest import SERVED_MODEL, random_prompt
from tests.router.test_errors import assert_error, post


def test_min_tokens_above_max_tokens_is_refused_by_both_apis(router, rng):
    prompt = random_prompt(rng, 12)
    params = common_pb2.SamplingParams(max_tokens=5, min_tokens=50, temperature=0)
    request = generate_pb2.CompletionRequest(
        model=SERVED_MODEL, token_ids=generate_pb2.TokenIds(ids=prompt), params=params
    )
    with grpc.insecure_channel(router.grpc) as channel:
        try:
            list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=30))
        except grpc.RpcError as exc:
            refused = exc
        else:
            raise AssertionError("min_tokens 50 with max_tokens 5 was accepted over gRPC")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_tokens" in refused.details(), refused.details()

    completion = {"model": SERVED_MODEL, "prompt": [prompt], "max_tokens": 5, "min_tokens": 50}
    assert_error(post(router, "/v1/completions", completion), 400, param="min_tokens")
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "min_tokens": 50}
    for limit in ("max_tokens", "max_completion_tokens"):
        assert_error(post(router, "/v1/chat/completions", {**chat, limit: 5}), 400, param="min_tokens")


def test_a_prompts_seeded_text_does_not_depend_on_its_place_in_the_list(router, rng):
    first, second = random_prompt(rng, 10), random_prompt(rng, 14)
    client = router.openai()

    def texts(prompts: list[list[int]], n: int) -> list[str]:
        answer = client.completions.create(
            model=SERVED_MODEL, prompt=prompts, max_tokens=12, temperature=1.0, seed=1234, n=n
        )
        return [choice.text for choice in sorted(answer.choices, key=lambda c: c.index)]

    alone = texts([first], 2)
    assert alone[0] != alone[1], "n > 1 with a seed: the choices get their own seeds"
    assert texts([first, second], 2)[:2] == alone  # prompt 0's choices 0 and 1
    assert texts([second, first], 2)[2:] == alone  # the same prompt at position 1: the same two texts
    assert texts([second, first], 1)[1] == texts([first], 1)[0]
