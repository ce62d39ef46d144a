"""The OpenAI-compatible API through the real `openai` SDK: greedy output equals transformers, usage,
stop strings, n > 1, logprobs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.checkpoints import hf_greedy
from tests.router.conftest import EOS, SERVED_MODEL, greedy_ignoring_eos, random_prompt, token_ids

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})


def _greedy_ids(client, prompt: list[int], max_tokens: int, stream: bool = False) -> tuple[list[int], str, str]:
    """(token ids, text, finish_reason) of a greedy completion of a token-id prompt."""
    if not stream:
        out = client.completions.create(
            model=SERVED_MODEL, prompt=[prompt], max_tokens=max_tokens, logprobs=0, **GREEDY
        )
        choice = out.choices[0]
        return token_ids(choice.logprobs.tokens), choice.text, choice.finish_reason
    ids, text, finish = [], "", None
    for chunk in client.completions.create(
        model=SERVED_MODEL, prompt=[prompt], max_tokens=max_tokens, logprobs=0, stream=True, **GREEDY
    ):
        for choice in chunk.choices:
            text += choice.text
            ids += token_ids(choice.logprobs.tokens) if choice.logprobs else []
            finish = choice.finish_reason or finish
    return ids, text, finish


@pytest.mark.parametrize(
    ("threshold", "decision"), [(1, "remote_prefill"), (10**6, "local_prefill")], ids=["remote", "local"]
)
def test_greedy_fp32_equals_transformers(make_router, cluster, checkpoint, rng, threshold, decision):
    router = make_router(cluster.prefills, [cluster.decode], local_prefill_threshold=threshold)
    client = router.openai()
    tokenizer = router.router.frontend.tokenizer
    lengths = [1, 15, 16, 17, 40, 100, 300]
    prompts = [random_prompt(rng, n) for n in lengths]
    max_tokens = 24
    expected = [greedy_ignoring_eos(checkpoint.model, p, max_tokens) for p in prompts]
    for prompt, want in zip(prompts[:3], expected):  # the oracle is transformers' own greedy, up to EOS
        hf = hf_greedy(checkpoint.model, prompt, max_tokens)
        assert want[: len(hf)] == hf and (len(hf) == max_tokens or hf[-1] == EOS)

    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent, so the workers batch them
        results = list(pool.map(lambda p: _greedy_ids(client, p, max_tokens), prompts))
    for length, (ids, text, finish), want in zip(lengths, results, expected):
        assert ids == want, f"{length}-token prompt: router output differs from transformers"
        assert text == tokenizer.decode(want)
        assert finish == "length"

    streamed = _greedy_ids(client, prompts[-2], max_tokens, stream=True)
    assert streamed == (expected[-2], tokenizer.decode(expected[-2]), "length")
    decisions = router.decisions()
    assert decisions.get(decision) == len(prompts) + 1, decisions
    assert sum(decisions.values()) == len(prompts) + 1, f"every request should be {decision}: {decisions}"


def test_stream_and_non_stream_agree(router, rng):
    client = router.openai()
    prompt = random_prompt(rng, 50)
    ids, text, finish = _greedy_ids(client, prompt, 20)
    assert (ids, text, finish) == _greedy_ids(client, prompt, 20, stream=True)
    assert len(ids) == 20 and finish == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count: {rng.random()}"}]
    full = client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=12, temperature=0)
    assert full.object == "chat.completion" and full.model == SERVED_MODEL
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason in ("length", "stop")
    chunks = list(
        client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [full.choices[0].finish_reason]


def test_usage_counts_and_cached_tokens(router, rng):
    client = router.openai()
    prompt = random_prompt(rng, 100)
    first = client.completions.create(model=SERVED_MODEL, prompt=[prompt], max_tokens=8, **GREEDY).usage
    assert (first.prompt_tokens, first.completion_tokens, first.total_tokens) == (100, 8, 108)
    again = client.completions.create(model=SERVED_MODEL, prompt=[prompt], max_tokens=8, **GREEDY).usage
    assert (again.prompt_tokens, again.completion_tokens) == (100, 8)
    cached = again.prompt_tokens_details.cached_tokens
    assert 0 < cached < 100 and cached % 16 == 0, f"a repeated prompt should be served from the prefix cache: {cached}"

    chunks = list(
        client.completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert (usage_chunks[0].usage.prompt_tokens, usage_chunks[0].usage.completion_tokens) == (100, 8)
    assert usage_chunks[0].usage.prompt_tokens_details.cached_tokens > 0

    messages = [{"role": "user", "content": "Tell me a story about a repeated prompt. " * 4 + str(rng.random())}]
    chat_first = client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=5, temperature=0
    ).usage
    chat_again = client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=5, temperature=0
    ).usage
    assert chat_first.prompt_tokens == chat_again.prompt_tokens > 16
    assert chat_again.total_tokens == chat_again.prompt_tokens + chat_again.completion_tokens
    assert chat_again.prompt_tokens_details.cached_tokens > 0


def _stop_string_for(text: str) -> str:
    """A stop string that first occurs a few characters into ``text``."""
    for i in range(3, len(text) - 1):
        if text[i].isascii() and text[i].isalnum():
            return text[i]
    raise AssertionError(f"no usable stop character in {text!r}")


def test_stop_strings_end_the_output_without_the_stop(router, rng):
    client = router.openai()
    prompt = random_prompt(rng, 40)
    plain = client.completions.create(
        model=SERVED_MODEL, prompt=[prompt], max_tokens=60, temperature=0, extra_body={"ignore_eos": True}
    )
    text = plain.choices[0].text
    stop = _stop_string_for(text)
    expected = text[: text.index(stop)]

    out = client.completions.create(
        model=SERVED_MODEL,
        prompt=[prompt],
        max_tokens=60,
        temperature=0,
        stop=[stop, "never-appears"],
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == expected and stop not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 60

    streamed = list(
        client.completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=60,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"

    messages = [{"role": "user", "content": f"stop test {rng.random()}"}]
    chat_plain = client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=60, temperature=0, extra_body={"ignore_eos": True}
    )
    content = chat_plain.choices[0].message.content
    chat_stop = _stop_string_for(content)
    chat_out = client.chat.completions.create(
        model=SERVED_MODEL,
        messages=messages,
        max_tokens=60,
        temperature=0,
        stop=[chat_stop],
        extra_body={"ignore_eos": True},
    )
    assert chat_out.choices[0].message.content == content[: content.index(chat_stop)]
    assert chat_out.choices[0].finish_reason == "stop"
    chat_chunks = list(
        client.chat.completions.create(
            model=SERVED_MODEL,
            messages=messages,
            max_tokens=60,
            temperature=0,
            stop=[chat_stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == content[: content.index(chat_stop)]
    assert chat_chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_have_distinct_indices_and_reproduce_with_a_seed(router, rng):
    client = router.openai()
    prompt = random_prompt(rng, 20)

    def sample(seed):
        out = client.completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=12,
            n=3,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        assert sorted(c.index for c in out.choices) == [0, 1, 2]
        assert out.usage.completion_tokens == 36
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first, "the same seed should reproduce every choice"
    assert len(set(first)) > 1, "n choices with one seed should still differ"
    assert sample(99) != first

    messages = [{"role": "user", "content": "two ways"}]

    def chat_stream(seed):
        texts: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for chunk in client.chat.completions.create(
            model=SERVED_MODEL,
            messages=messages,
            max_tokens=10,
            n=2,
            temperature=1.0,
            seed=seed,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        assert sorted(texts) == [0, 1] and finishes == {0: "length", 1: "length"}
        return texts

    assert chat_stream(7) == chat_stream(7)


def test_logprobs_shapes(router, rng):
    client = router.openai()
    prompt = random_prompt(rng, 30)
    out = client.completions.create(model=SERVED_MODEL, prompt=[prompt], max_tokens=6, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and all(v <= 0 for v in top.values())
        assert logprob <= 0
        best = max(top, key=top.get)
        assert best == chosen and top[best] == pytest.approx(logprob, abs=1e-5), "greedy picks the most likely token"
        assert list(top.values()) == sorted(top.values(), reverse=True)

    text_lp = (
        client.completions.create(model=SERVED_MODEL, prompt=[prompt], max_tokens=6, logprobs=2, temperature=0)
        .choices[0]
        .logprobs
    )
    assert len(text_lp.tokens) == 6 and all(1 <= len(top) <= 2 for top in text_lp.top_logprobs)
    assert text_lp.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)

    streamed = list(
        client.completions.create(model=SERVED_MODEL, prompt=[prompt], max_tokens=6, logprobs=3, stream=True, **GREEDY)
    )
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens

    messages = [{"role": "user", "content": "logprobs please"}]
    chat = client.chat.completions.create(
        model=SERVED_MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    for entry in content:
        assert isinstance(entry.token, str) and isinstance(entry.bytes, list) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    no_lp = client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=5, temperature=0)
    assert no_lp.choices[0].logprobs is None


def test_models_lists_the_served_model(router):
    models = router.openai().models.list()
    assert [m.id for m in models.data] == [SERVED_MODEL]
    # created: when this router began serving the model, not 0 (clients sort and cache by it).
    assert time.time() - 24 * 3600 < models.data[0].created <= time.time()
