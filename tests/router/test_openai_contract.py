"""The rest of the OpenAI/vLLM contract, through the real router and workers: logit_bias, min_tokens, echo and
prompt logprobs (lm-eval-harness's log-likelihood request, against transformers), best_of, stop_reason,
continuous usage, lists of prompts (streamed, and their usage), and the /v1/models/{id}, /tokenize, /detokenize
and /version endpoints."""

from __future__ import annotations

import importlib.metadata

import httpx
import pytest
import torch

from tests.router.conftest import EOS, MAX_MODEL_LEN, SERVED_MODEL, VOCAB, greedy_ignoring_eos, random_prompt, token_ids
from tests.router.test_errors import assert_error, post
from tests.router.test_openai_api import _stop_string_for

AS_IDS = {"return_tokens_as_token_ids": True}


def _oracle_prompt_logprobs(model, prompt: list[int]) -> list[float]:
    """transformers' log_softmax of each prompt token given the ones before it (fp32, the same weights)."""
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    return logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1).tolist()


def test_logit_bias_and_min_tokens_on_both_paths(router, rng):
    """A 40-token prompt is prefilled remotely (its first token sampled on the prefill worker), an 8-token one
    locally: the bias and min_tokens hold on the first token and on every decode step."""
    client = router.openai()
    for length in (40, 8):
        prompt = random_prompt(rng, length)
        favoured = rng.randrange(3, VOCAB)
        out = client.completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=6,
            temperature=0,
            logprobs=0,
            extra_body={**AS_IDS, "logit_bias": {str(favoured): 100}},
        )
        assert token_ids(out.choices[0].logprobs.tokens) == [favoured] * 6, length
        # EOS made the likeliest token: it ends the request at once, unless min_tokens holds it back.
        args = dict(model=SERVED_MODEL, prompt=[prompt], max_tokens=8, temperature=0, logprobs=0)
        eos_first = client.completions.create(**args, extra_body={**AS_IDS, "logit_bias": {str(EOS): 100}})
        assert token_ids(eos_first.choices[0].logprobs.tokens) == [EOS]
        held = client.completions.create(**args, extra_body={**AS_IDS, "logit_bias": {str(EOS): 100}, "min_tokens": 3})
        ids = token_ids(held.choices[0].logprobs.tokens)
        assert len(ids) == 4 and EOS not in ids[:3] and ids[3] == EOS, (length, ids)
        assert held.choices[0].finish_reason == "stop"
    body = {"model": SERVED_MODEL, "prompt": "bias", "max_tokens": 2}
    assert_error(post(router, "/v1/completions", {**body, "logit_bias": {str(VOCAB): 1}}), 400, param="logit_bias")
    assert_error(post(router, "/v1/completions", {**body, "logit_bias": {"x": 1}}), 400, param="logit_bias")
    # A digit that is not ASCII ("²" would have crashed int(), "٣" read as 3), and one id under two keys.
    for bias in ({"²": 1}, {"٣": 1}, {"28": 1, "028": 2}):
        assert_error(post(router, "/v1/completions", {**body, "logit_bias": bias}), 400, param="logit_bias")
    assert_error(post(router, "/v1/completions", {**body, "logit_bias": {"5": 101}}), 400, param="logit_bias")
    assert_error(post(router, "/v1/completions", {**body, "min_tokens": 3}), 400, param="min_tokens")
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    favoured = rng.randrange(3, VOCAB)
    answer = post(router, "/v1/chat/completions", {**chat, "logit_bias": {str(favoured): 100}, "logprobs": True})
    assert answer.status_code == 200, answer.text
    assert [router.router.frontend.token_text(favoured)] * 3 == [
        c["token"] for c in answer.json()["choices"][0]["logprobs"]["content"]
    ]


@pytest.fixture(params=["remote", "local"])
def path(request, router, make_router, cluster):
    """(router, prompt length, decision): every request prefilled on a prefill worker, which samples the first
    token (a router whose threshold sends even a cached prompt there), or on the decode worker (the shared
    router, with a prompt below its threshold)."""
    if request.param == "remote":
        return make_router(cluster.prefills, [cluster.decode], local_prefill_threshold=0), 40, "remote_prefill"
    return router, 8, "local_prefill"


def _only(decision: str, before: dict[str, float], after: dict[str, float]) -> None:
    grown = {d for d in after if after[d] != before.get(d, 0)}
    assert grown == {decision}, (decision, before, after)


def _masked_greedy(model, prompt: list[int], allowed: list[int], steps: int) -> list[int]:
    """transformers' fp32 logits at each step, argmax over the allowed ids only."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            tokens.append(allowed[int(logits[allowed].argmax())])
    return tokens


def test_allowed_token_ids_on_both_paths(path, checkpoint, rng):
    """The mask holds on the first token and on every decode step: greedy is transformers' argmax over the allowed
    ids, and sampling draws only them."""
    router, length, decision = path
    client = router.openai()
    before = router.decisions()
    allowed = sorted(rng.sample(range(3, VOCAB), 10))  # no EOS among them: every request runs to max_tokens
    prompt = random_prompt(rng, length)
    args = dict(model=SERVED_MODEL, prompt=[prompt], max_tokens=8, logprobs=0)
    extra = {**AS_IDS, "allowed_token_ids": allowed}
    greedy = client.completions.create(**args, temperature=0, extra_body=extra).choices[0]
    assert token_ids(greedy.logprobs.tokens) == _masked_greedy(checkpoint.model, prompt, allowed, 8)
    assert token_ids(greedy.logprobs.tokens) != greedy_ignoring_eos(checkpoint.model, prompt, 8)
    sampled = client.completions.create(**args, temperature=1.5, seed=4, stream=True, extra_body=extra)
    ids = [t for c in sampled for t in token_ids(c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(ids) == 8 and set(ids) <= set(allowed), ids
    favoured = rng.randrange(3, VOCAB)
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    answer = post(router, "/v1/chat/completions", {**chat, "allowed_token_ids": [favoured], "logprobs": True})
    assert answer.status_code == 200, answer.text
    assert [c["token"] for c in answer.json()["choices"][0]["logprobs"]["content"]] == [
        router.router.frontend.token_text(favoured)
    ] * 3
    if decision == "remote_prefill":
        _only(decision, before, router.decisions())
    body = {"model": SERVED_MODEL, "prompt": "mask", "max_tokens": 2}
    for bad in ([VOCAB], [-1], [], 7):
        assert_error(
            post(router, "/v1/completions", {**body, "allowed_token_ids": bad}), 400, param="allowed_token_ids"
        )


def test_bad_words_on_both_paths(path, checkpoint, rng):
    """A one-token bad word is never sampled, the prefill worker's first token included; a two-token one never
    finishes. Output restricted to letters (one byte token each), so that words and tokens line up."""
    router, length, decision = path
    client = router.openai()
    before = router.decisions()
    letters = [3 + ord(c) for c in "abcdefgh"]
    prompt = random_prompt(rng, length)
    plain = _masked_greedy(checkpoint.model, prompt, letters, 10)
    words = [chr(plain[0] - 3), chr(plain[2] - 3) + chr(plain[3] - 3)]
    banned = [tuple(3 + ord(c) for c in word) for word in words]
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            logits = checkpoint.model(torch.tensor([prompt + expected])).logits[0, -1].float()
            tail = tuple(expected)
            held = {w[-1] for w in banned if len(w) - 1 <= len(tail) and tail[len(tail) - len(w) + 1 :] == w[:-1]}
            expected.append(max((t for t in letters if t not in held), key=lambda t, row=logits: float(row[t])))
    assert expected != plain
    args = dict(model=SERVED_MODEL, prompt=[prompt], max_tokens=10, temperature=0, logprobs=0)
    extra = {**AS_IDS, "allowed_token_ids": letters, "bad_words": words}
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(**args, stream=True, extra_body=extra))
            got = [t for c in chunks if c.choices[0].logprobs for t in token_ids(c.choices[0].logprobs.tokens)]
        else:
            got = token_ids(client.completions.create(**args, extra_body=extra).choices[0].logprobs.tokens)
        assert got == expected, stream
    if decision == "remote_prefill":
        _only(decision, before, router.decisions())
    body = {"model": SERVED_MODEL, "prompt": "words", "max_tokens": 2}
    for bad, param in [([""], "bad_words"), (["  "], "bad_words"), (["x"] * 65, "bad_words"), ([3], "bad_words.0")]:
        assert_error(post(router, "/v1/completions", {**body, "bad_words": bad}), 400, param=param)


def test_special_tokens_and_stop_strings_kept_on_request_on_both_paths(path, rng):
    """skip_special_tokens and include_stop_str_in_output (vLLM's semantics), streamed and not."""
    router, length, decision = path
    client = router.openai()
    before = router.decisions()
    letters = [3 + ord(c) for c in "abcdefgh"]  # byte tokens: one per character
    prompt = random_prompt(rng, length)

    def completion(stream: bool = False, **extra) -> tuple[str, str]:
        args = dict(model=SERVED_MODEL, prompt=[prompt], max_tokens=extra.pop("max_tokens", 8), temperature=0)
        if stream:
            chunks = list(client.completions.create(**args, stream=True, extra_body=extra))
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        choice = client.completions.create(**args, extra_body=extra).choices[0]
        return choice.text, choice.finish_reason

    # EOS first: it ends the request; its text, </s>, only with both fields.
    eos = {"logit_bias": {str(EOS): 100}}
    both = {"skip_special_tokens": False, "include_stop_str_in_output": True}
    for stream in (False, True):
        assert completion(stream, **eos) == ("", "stop")
        assert completion(stream, **eos, skip_special_tokens=False) == ("", "stop")
        assert completion(stream, **eos, include_stop_str_in_output=True) == ("", "stop")
        assert completion(stream, **eos, **both) == ("</s>", "stop"), stream
        # Special tokens that do not stop the request: kept on request.
        assert completion(stream, **eos, ignore_eos=True, skip_special_tokens=False) == ("</s>" * 8, "length")
    # A stop token as the first token: its text, "a", only with include_stop_str_in_output.
    first = {"logit_bias": {str(letters[0]): 100}, "stop_token_ids": [letters[0]]}
    for stream in (False, True):
        assert completion(stream, **first) == ("", "stop"), stream
        assert completion(stream, **first, include_stop_str_in_output=True) == ("a", "stop"), stream
    # A stop string across tokens: the text up to and including it, nothing after; stop_reason names it.
    free = {"allowed_token_ids": letters, "ignore_eos": True, "max_tokens": 30}
    plain, _ = completion(**free)
    stop = plain[10:13]
    expected = plain[: plain.find(stop) + len(stop)]
    for stream in (False, True):
        assert completion(stream, **free, stop=[stop]) == (expected[: -len(stop)], "stop")
        assert completion(stream, **free, stop=[stop], include_stop_str_in_output=True) == (expected, "stop")
    body = {"model": SERVED_MODEL, "prompt": prompt, "temperature": 0, "stop": [stop], **free}
    kept = post(router, "/v1/completions", {**body, "include_stop_str_in_output": True}).json()["choices"][0]
    assert (kept["text"], kept["stop_reason"]) == (expected, stop)
    # text_offset counts the special tokens' text the choice shows.
    shown = client.completions.create(
        model=SERVED_MODEL,
        prompt=[prompt],
        max_tokens=3,
        temperature=0,
        logprobs=0,
        extra_body={**eos, "ignore_eos": True, "skip_special_tokens": False},
    ).choices[0]
    start = len(router.router.frontend.tokenizer.decode(prompt, skip_special_tokens=False))
    assert (shown.text, shown.logprobs.text_offset) == ("</s>" * 3, [start, start + 4, start + 8])
    # Chat: the same fields.
    messages = [{"role": "user", "content": f"special {rng.random()}"}]
    args = dict(model=SERVED_MODEL, messages=messages, max_tokens=4, temperature=0)
    assert client.chat.completions.create(**args, extra_body={**eos, **both}).choices[0].message.content == "</s>"
    chunks = client.chat.completions.create(**args, stream=True, extra_body={**eos, **both})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "</s>"
    if decision == "remote_prefill":
        _only(decision, before, router.decisions())
    # spaces_between_special_tokens: true, vLLM's default that clients send, asks for nothing; false is refused.
    body = {"model": SERVED_MODEL, "prompt": "spaces", "max_tokens": 2}
    assert post(router, "/v1/completions", {**body, "spaces_between_special_tokens": True}).status_code == 200
    error = assert_error(
        post(router, "/v1/completions", {**body, "spaces_between_special_tokens": False}),
        400,
        param="spaces_between_special_tokens",
    )
    assert "spaces_between_special_tokens is not supported" in error["message"]


def test_echo_scores_the_prompt_like_transformers(router, checkpoint, rng):
    """lm-eval-harness's log-likelihood request: echo, max_tokens 0, logprobs. A 48-token prompt would be prefilled
    remotely; prompt logprobs send it to a decode worker's local prefill instead."""
    client = router.openai()
    prompt = random_prompt(rng, 48)
    expected = _oracle_prompt_logprobs(checkpoint.model, prompt)
    before = router.decisions().get("local_prefill", 0)
    out = client.completions.create(
        model=SERVED_MODEL, prompt=[prompt], max_tokens=0, echo=True, logprobs=1, temperature=0, extra_body=AS_IDS
    )
    choice = out.choices[0]
    assert router.decisions().get("local_prefill", 0) == before + 1
    assert token_ids(choice.logprobs.tokens) == prompt
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs[1:]), torch.tensor(expected), atol=1e-3)
    with torch.no_grad():
        argmax = checkpoint.model(torch.tensor([prompt])).logits[0, :-1].argmax(-1).tolist()
    assert [list(top) for top in choice.logprobs.top_logprobs[1:]] == [[f"token_id:{t}"] for t in argmax]
    tokenizer = router.router.frontend.tokenizer
    assert choice.text == tokenizer.decode(prompt, skip_special_tokens=False)
    assert (choice.finish_reason, out.usage.prompt_tokens, out.usage.completion_tokens) == ("length", 48, 0)

    # Echo with a completion: the prompt's tokens, then the generated ones; streamed the same.
    greedy = greedy_ignoring_eos(checkpoint.model, prompt, 4)
    args = dict(model=SERVED_MODEL, prompt=[prompt], max_tokens=4, echo=True, logprobs=0, temperature=0)
    both = client.completions.create(**args, extra_body={**AS_IDS, "ignore_eos": True}).choices[0]
    assert token_ids(both.logprobs.tokens) == prompt + greedy
    assert torch.allclose(torch.tensor(both.logprobs.token_logprobs[1:48]), torch.tensor(expected), atol=1e-3)
    assert both.text == tokenizer.decode(prompt, skip_special_tokens=False) + tokenizer.decode(greedy)
    streamed = list(client.completions.create(**args, stream=True, extra_body={**AS_IDS, "ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == both.text
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == both.logprobs.tokens
    # Echo of a text prompt returns it as sent; without logprobs nothing is scored.
    text = client.completions.create(model=SERVED_MODEL, prompt="echo me", max_tokens=0, echo=True)
    assert (text.choices[0].text, text.choices[0].logprobs) == ("echo me", None)


def test_prompt_logprobs_are_transformers_scores_and_ranks(router, checkpoint, rng):
    """vLLM's prompt_logprobs: per prompt token after the first, by token id, its logprob and rank among the whole
    vocabulary and the most likely tokens'; a completion's on each choice, a chat's once beside its choices."""
    client = router.openai()
    prompt = random_prompt(rng, 40)
    with torch.no_grad():
        oracle = checkpoint.model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    out = client.completions.create(
        model=SERVED_MODEL,
        prompt=[prompt],
        max_tokens=2,
        temperature=0,
        extra_body={**AS_IDS, "prompt_logprobs": 2, "ignore_eos": True},
    )
    scored = out.model_dump()["choices"][0]["prompt_logprobs"]
    assert len(scored) == len(prompt) and scored[0] is None
    ranks = []
    for position, (token_id, entries) in enumerate(zip(prompt[1:], scored[1:])):
        row = oracle[position]
        own = entries[str(token_id)]
        rank = int((row > row[token_id]).sum()) + 1
        assert (own["rank"], own["decoded_token"]) == (rank, f"token_id:{token_id}")
        assert own["logprob"] == pytest.approx(float(row[token_id]), abs=1e-3)
        top = row.topk(2)
        for r, (value, top_id) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            assert entries[str(top_id)]["rank"] == r
            assert entries[str(top_id)]["logprob"] == pytest.approx(value, abs=1e-3)
        assert len(entries) == 2 + (rank > 2)
        ranks.append(rank)
    assert max(ranks) > 2, "a random prompt has tokens outside the top two: their own entry is the third"
    assert out.usage.completion_tokens == 2  # and the completion is generated as usual
    # prompt_logprobs have their own place: the choice's logprobs are the returned text's, and only if asked for.
    assert out.choices[0].logprobs is None
    asked = dict(model=SERVED_MODEL, prompt=[prompt], max_tokens=2, temperature=0)
    scored_too = client.completions.create(
        **asked, logprobs=1, extra_body={**AS_IDS, "prompt_logprobs": 1, "ignore_eos": True}
    ).choices[0]
    assert len(scored_too.logprobs.tokens) == len(scored_too.logprobs.text_offset) == 2
    echoed = client.completions.create(**asked, echo=True, extra_body={"prompt_logprobs": 1}).choices[0]
    assert echoed.logprobs is None and len(echoed.model_dump()["prompt_logprobs"]) == len(prompt)

    chat = client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": "score me"}],
        max_tokens=2,
        n=2,
        extra_body={"prompt_logprobs": 0},
    ).model_dump()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    assert all(len(entries) == 1 for entries in chat["prompt_logprobs"][1:])
    assert all("prompt_logprobs" not in choice for choice in chat["choices"])
    for body, param in [
        ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": 1, "echo": True, "logprobs": 2}, "prompt_logprobs"),
    ]:
        assert_error(post(router, "/v1/completions", {"model": SERVED_MODEL, **body}), 400, param=param)


def test_best_of_returns_the_most_likely_candidates(router, rng):
    client = router.openai()
    prompt = random_prompt(rng, 12)
    args = dict(model=SERVED_MODEL, prompt=[prompt], max_tokens=6, temperature=1.2, seed=9)
    # The candidates best_of=4 draws are the choices n=4 draws with the same seed.
    everyone = client.completions.create(**args, n=4, logprobs=0, extra_body={**AS_IDS, "ignore_eos": True})
    ranked = sorted(everyone.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = client.completions.create(**args, n=2, best_of=4, extra_body={**AS_IDS, "ignore_eos": True})
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert len({c.text for c in everyone.choices}) > 2, "the candidates should differ"
    body = {"model": SERVED_MODEL, "prompt": "best", "max_tokens": 2}
    assert_error(post(router, "/v1/completions", {**body, "n": 3, "best_of": 2}), 400, param="best_of")
    assert_error(post(router, "/v1/completions", {**body, "best_of": 2, "stream": True}), 400, param="best_of")
    error = assert_error(post(router, "/v1/completions", {**body, "suffix": "end"}), 400, param="suffix")
    assert "fill-in-the-middle" in error["message"]


def test_stop_reason_names_what_stopped(router, checkpoint, rng):
    prompt = random_prompt(rng, 16)
    greedy = greedy_ignoring_eos(checkpoint.model, prompt, 60)
    body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    by_id = post(router, "/v1/completions", {**body, "stop_token_ids": [greedy[4]]}).json()["choices"][0]
    assert (by_id["finish_reason"], by_id["stop_reason"]) == ("stop", greedy[4])
    text = post(router, "/v1/completions", body).json()["choices"][0]["text"]
    stop = _stop_string_for(text)
    by_text = post(router, "/v1/completions", {**body, "stop": ["\x00never", stop]}).json()["choices"][0]
    assert (by_text["finish_reason"], by_text["stop_reason"]) == ("stop", stop)
    length = post(router, "/v1/completions", {**body, "max_tokens": 3}).json()["choices"][0]
    assert (length["finish_reason"], length["stop_reason"]) == ("length", None)
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 0}
    answer = post(router, "/v1/chat/completions", {**chat, "ignore_eos": True}).json()["choices"][0]
    assert (answer["finish_reason"], answer["stop_reason"]) == ("length", None)


def test_lists_of_prompts_stream_with_indices_and_count_usage_once(router, rng):
    client = router.openai()
    prompts = [random_prompt(rng, 3), random_prompt(rng, 5)]
    args = dict(model=SERVED_MODEL, prompt=prompts, max_tokens=4, n=2, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (8, 16)
    texts: dict[int, str] = {}
    usages = []
    for chunk in client.completions.create(
        **args, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usages.append(chunk.usage)
    assert texts == {c.index: c.text for c in whole.choices}
    assert all(u is not None and u.prompt_tokens == 8 for u in usages), "continuous usage: on every chunk"
    completion = [u.completion_tokens for u in usages]
    assert completion == sorted(completion) and completion[-1] == 16 and completion[0] < 16
    assert usages[-1].total_tokens == 24
    # Without include_usage there is no usage-only chunk, but each chunk still carries its usage so far.
    chunks = list(client.completions.create(**args, stream=True, stream_options={"continuous_usage_stats": True}))
    assert all(c.choices and c.usage is not None for c in chunks)


def test_model_tokenize_detokenize_and_version_endpoints(router):
    http = router.http
    card = httpx.get(f"{http}/v1/models/{SERVED_MODEL}", timeout=10)
    assert card.status_code == 200 and card.json()["id"] == SERVED_MODEL
    assert card.json() == httpx.get(f"{http}/v1/models", timeout=10).json()["data"][0]
    assert router.openai().models.retrieve(SERVED_MODEL).id == SERVED_MODEL
    assert_error(httpx.get(f"{http}/v1/models/no-such-model", timeout=10), 404, "model_not_found")

    tokenizer = router.router.frontend.tokenizer
    text = "Tokenize me, please."
    plain = post(router, "/tokenize", {"prompt": text}).json()
    assert plain == {
        "tokens": tokenizer.encode(text),
        "count": len(tokenizer.encode(text)),
        "max_model_len": MAX_MODEL_LEN,
    }
    bare = post(router, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert bare == tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": text}]
    chat = post(router, "/tokenize", {"model": SERVED_MODEL, "messages": messages}).json()
    served = router.openai().chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=1)
    assert chat["count"] == served.usage.prompt_tokens
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    no_turn = post(router, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert no_turn == tokenizer.encode(rendered, add_special_tokens=False) != chat["tokens"]
    assert_error(post(router, "/tokenize", {}), 400, param="prompt")
    assert_error(post(router, "/tokenize", {"prompt": "x", "model": "other"}), 404, "model_not_found")

    back = post(router, "/detokenize", {"tokens": bare}).json()
    assert back == {"prompt": text}
    assert_error(post(router, "/detokenize", {"tokens": [VOCAB]}), 400, param="tokens")

    version = httpx.get(f"{http}/version", timeout=10).json()
    assert version == {"version": importlib.metadata.version("splitserve")}
