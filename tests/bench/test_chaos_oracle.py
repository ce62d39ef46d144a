"""The chaos command's oracle and parsing, without a cluster: what counts as wrong, and the evidence it gives."""

from __future__ import annotations

import dataclasses

from bench.chaos_faults import routing_share
from bench.chaos_workload import Answer, Reference, _take_chunk, build_prompts, judge


def _answer(text: str, token_ids: list[int], tops: list[dict[int, float]] | None = None) -> Answer:
    return Answer(
        status=200,
        text=text,
        token_ids=list(token_ids),
        top=tops or [{t: -1.0, t + 1: -2.0} for t in token_ids],
        finish_reason="length",
        completion_tokens=len(token_ids),
        done=True,
    )


def test_the_same_text_and_tokens_is_ok():
    reference = Reference.of(_answer("héllo", [10, 11, 12]))
    assert judge(_answer("héllo", [10, 11, 12]), reference, 1e-4) == ("ok", {})


def test_text_lost_at_a_migration_point_is_wrong_though_the_tokens_match():
    reference = Reference.of(_answer("ab\ufffdcd", [3, 4, 200, 5, 6]))
    reference = dataclasses.replace(reference, pieces=("a", "b", "", "\ufffdc", "d"))
    lost = _answer("abcd", [3, 4, 200, 5, 6])
    lost.pieces = ["a", "b", "", "c", "d"]
    verdict, evidence = judge(lost, reference, 1e-4)
    assert verdict == "wrong"
    assert evidence["token_ids_match"] is True
    assert evidence["first_char_diff"] == 2
    assert evidence["replacement_chars"] == [0, 1]
    assert evidence["first_chunk_diff"] == 3


def test_a_token_that_differs_where_the_reference_had_a_tie_is_a_near_tie_not_wrong():
    tops = [{5: -1.0, 9: -1.00001}, {6: -1.0, 7: -3.0}]
    reference = Reference.of(_answer("xy", [5, 6], tops))
    verdict, evidence = judge(_answer("zy", [9, 6]), reference, 1e-4)
    assert verdict == "near_tie" and evidence["first_token_diff"] == 0
    assert judge(_answer("zy", [9, 6]), reference, 0.0)[0] == "wrong"


def test_a_stream_that_ends_without_a_finish_reason_is_wrong():
    reference = Reference.of(_answer("abc", [1, 2, 3]))
    truncated = _answer("ab", [1, 2])
    truncated.finish_reason = None
    assert judge(truncated, reference, 1e-4)[0] == "wrong"


def test_chunks_of_both_apis_yield_text_and_token_ids():
    completion, chat = Answer(), Answer()
    _take_chunk(
        {
            "choices": [
                {
                    "text": "A",
                    "finish_reason": None,
                    "logprobs": {
                        "tokens": ["token_id:68"],
                        "top_logprobs": [{"token_id:68": -1.0, "token_id:70": -2.0}],
                    },
                }
            ]
        },
        completion,
        chat=False,
    )
    _take_chunk(
        {
            "choices": [
                {
                    "delta": {"content": "A"},
                    "finish_reason": "length",
                    "logprobs": {"content": [{"token": "token_id:68", "logprob": -1.0, "top_logprobs": []}]},
                }
            ]
        },
        chat,
        chat=True,
    )
    assert (completion.text, completion.token_ids, completion.top) == ("A", [68], [{68: -1.0, 70: -2.0}])
    assert (chat.text, chat.token_ids, chat.finish_reason) == ("A", [68], "length")
    errored = Answer()
    _take_chunk({"error": {"message": "decode workers lost", "code": "service_unavailable"}}, errored, chat=False)
    assert errored.error_key == "stream:service_unavailable"


def test_prompts_are_distinct_from_their_first_block_and_reproducible():
    prompts = build_prompts(40, 320, seed=7)
    assert [p.text for p in prompts] == [p.text for p in build_prompts(40, 320, seed=7)]
    assert len({p.text[:16] for p in prompts}) == 40
    assert {p.kind for p in prompts} == {"long", "multibyte", "chat", "short"}
    assert any(len(p.text.encode()) > len(p.text) for p in prompts if p.kind == "multibyte")


def test_routing_share_counts_the_decisions_between_two_snapshots():
    before = {'splitserve_routing_decisions{decision="remote_prefill"}': 10.0}
    after = {
        'splitserve_routing_decisions{decision="remote_prefill"}': 40.0,
        'splitserve_routing_decisions{decision="local_prefill"}': 10.0,
    }
    assert routing_share(before, after) == {
        "decisions": {"remote_prefill": 30.0, "local_prefill": 10.0},
        "p_to_d_share": 0.75,
    }
