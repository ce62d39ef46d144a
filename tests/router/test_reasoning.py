"""--reasoning-parser: a reasoning model's thinking (<think>…</think>) comes back as a chat completion's
reasoning_content, apart from its content, whole and streamed, where the prompt says the output starts (inside the
thinking when the prompt's last tag opens it). The model: a random Qwen2 whose BPE tokenizer has <think> and
</think> tokens, and a template whose generation prompt opens the thinking when asked; a logit bias on </think>
makes it close the thinking partway. The oracle is the same request's text from a router without the parser; under a
grammar or a thinking budget, that router's completion after the prompt and the thinking."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import grpc
import httpx
import pytest
import transformers

from engine.thinking import CLOSE, OPEN
from protos import common_pb2, generate_pb2, generate_pb2_grpc
from router.config import RouterConfig
from router.reasoning import Splitter
from router.served_model import ModelBinding
from tests.checkpoints import close_thinking_at, write_thinking_model
from tests.router.conftest import SERVED_MODEL, RouterThread, token_ids, wait_for
from tests.router.test_errors import assert_error, post
from tests.workers.harness import start_workers, stop_workers

# The generation prompt opens the thinking unless enable_thinking is false (DeepSeek-R1's and newer Qwen3 templates
# open it; an earlier turn's reasoning_content is written inside its turn's tags).
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}"
)
MODEL = "bpe-thinking"
QUESTION = "Think first: what is 2 + 2?"
LIMIT = 24


# -- the splitter, piece by piece -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inside", "text", "thinking", "answer"),
    [
        (True, "a plan</think>\n\nthe answer", "a plan", "\n\nthe answer"),
        (True, "still thinking", "still thinking", ""),
        (False, "<think>a plan</think>answer", "a plan", "answer"),
        (False, "answer <think>not thinking</think>", "", "answer <think>not thinking</think>"),
        (False, "<thin", "", "<thin"),
        (True, "x</thi", "x</thi", ""),
        (False, "", "", ""),
    ],
)
def test_every_split_of_the_text_gives_the_whole_texts_parts(inside, text, thinking, answer):
    assert Splitter(inside).split(text) == (thinking, answer)
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            splitter = Splitter(inside)
            pieces = [splitter.feed(text[:cut]), splitter.feed(text[cut:second]), splitter.feed(text[second:])]
            pieces.append(splitter.end())
            assert ("".join(p[0] for p in pieces), "".join(p[1] for p in pieces)) == (thinking, answer), (cut, second)


def test_a_model_without_think_tokens_is_refused_by_name(checkpoint):
    config = RouterConfig(model=str(checkpoint.path), served_model_name=SERVED_MODEL, reasoning_parser="qwen3")
    with pytest.raises(ValueError, match="no <think> token"):
        ModelBinding(config)


def test_workers_serving_a_model_without_think_tokens_are_not_adopted(cluster):
    """Not told the model, the router adopts the workers': one whose tokenizer has no tags is refused, and /ready
    says why."""
    config = RouterConfig(
        port=0, grpc_port=0, decode_addresses=(cluster.decode.address,), reasoning_parser="deepseek_r1"
    )
    router = RouterThread(config, ready=False)
    try:
        wait_for(lambda: router.call(lambda: router.router.frontend.model.refusal), 10, "the card to be refused")
        ready = httpx.get(f"{router.http}/ready", timeout=10)
        assert ready.status_code == 503 and "no <think> token" in ready.json()["model"]["refusal"]
    finally:
        router.stop()


# -- through a router and a decode worker --------------------------------------------------------------


@dataclass
class Served:
    parsed: RouterThread
    raw: RouterThread
    disaggregated: RouterThread  # parsed, its prompts prefilled apart: the first token is the prefill worker's


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    model_dir = tmp_path_factory.mktemp("thinking") / MODEL
    model = write_thinking_model(model_dir, TEMPLATE)
    oracle = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    said = [{"role": "user", "content": QUESTION}]
    prompt = oracle.apply_chat_template(said, add_generation_prompt=True, tokenize=True, return_dict=True)
    close_thinking_at(model, model_dir, list(prompt["input_ids"]), 2, oracle.convert_tokens_to_ids(CLOSE))
    decode, prefill = start_workers(("decode", str(model_dir)), ("prefill", str(model_dir)))
    routers = []
    try:
        for parser, prefills in (("qwen3", ()), ("none", ()), ("qwen3", (prefill.address,))):
            config = RouterConfig(
                port=0,
                grpc_port=0,
                prefill_addresses=prefills,
                decode_addresses=(decode.address,),
                reasoning_parser=parser,
                health_interval_s=0.2,
                local_prefill_threshold=0,  # with a prefill worker, every prompt is prefilled there
            )
            routers.append(RouterThread(config))
        yield Served(*routers)
    finally:
        for router in routers:
            router.stop()
        stop_workers([decode, prefill])


def _chat(router: RouterThread, enable_thinking: bool | None = None, stream: bool = False, **fields):
    """The question as a greedy chat completion (``fields``: more of the SDK's arguments)."""
    kwargs = {} if enable_thinking is None else {"chat_template_kwargs": {"enable_thinking": enable_thinking}}
    return router.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=LIMIT,
        temperature=0,
        stream=stream,
        extra_body={**kwargs, **fields.pop("extra_body", {})},
        **fields,
    )


def _respond(router: RouterThread, stream: bool = False, **fields):
    fields = {"input": QUESTION, **fields}
    return router.openai().responses.create(
        model=MODEL, max_output_tokens=LIMIT, temperature=0, stream=stream, **fields
    )


def _streamed(chunks) -> tuple[str, str]:
    thinking, answer = [], []
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            thinking.append(delta.get("reasoning_content") or "")
            answer.append(delta.get("content") or "")
    return "".join(thinking), "".join(answer)


def _raw_parts(served: Served) -> tuple[str, str]:
    """The (thinking, answer) of the raw router's text, the prompt opening the thinking."""
    raw = _chat(served.raw, enable_thinking=True).choices[0].message.content
    thinking, closed, answer = raw.partition(CLOSE)
    assert closed and thinking and answer, f"the model was made to close its thinking partway: {raw!r}"
    return thinking, answer


def test_thinking_opened_by_the_prompt_is_reasoning_content_up_to_its_close(served):
    thinking, answer = _raw_parts(served)
    parsed = _chat(served.parsed, enable_thinking=True).choices[0].message
    assert (parsed.model_dump()["reasoning_content"], parsed.content) == (thinking, answer)
    assert _streamed(_chat(served.parsed, enable_thinking=True, stream=True)) == (thinking, answer)


def test_without_thinking_opened_the_text_is_all_answer(served):
    raw = _chat(served.raw, enable_thinking=False).choices[0].message
    assert not raw.content.startswith(OPEN)
    parsed = _chat(served.parsed, enable_thinking=False).choices[0].message
    assert (parsed.model_dump()["reasoning_content"], parsed.content) == (None, raw.content)
    assert _streamed(_chat(served.parsed, enable_thinking=False, stream=True)) == ("", raw.content)
    assert "reasoning_content" not in raw.model_dump()


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def _output_ids(router: RouterThread, **fields) -> list[int]:
    """The greedy chat completion's tokens (the question, the prompt opening the thinking)."""
    chat = _chat(router, logprobs=True, extra_body={"return_tokens_as_token_ids": True, **fields})
    return token_ids([t.token for t in chat.choices[0].logprobs.content])


def _prompt_ids(router: RouterThread) -> list[int]:
    said = {"messages": [{"role": "user", "content": QUESTION}]}
    return httpx.post(f"{router.http}/tokenize", json=said, timeout=10).json()["tokens"]


def _continued(router: RouterThread, prompt: list[int], limit: int, **fields) -> str:
    """The raw router's greedy text after ``prompt`` (token ids)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": limit, "temperature": 0, **fields}
    response = httpx.post(f"{router.http}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _close_id(router: RouterThread) -> int:
    body = {"prompt": CLOSE, "add_special_tokens": False}
    (close,) = httpx.post(f"{router.http}/tokenize", json=body, timeout=10).json()["tokens"]
    return close


def test_structured_output_holds_the_answer_after_the_thinking(served):
    """The grammar holds the answer, not the thinking: the thinking is the one the model writes unconstrained, and
    the answer is what the grammar makes of the rest (the raw router's completion after the prompt and that
    thinking, under the same schema). Chat (whole and streamed), Responses and Messages alike."""
    thinking, _ = _raw_parts(served)
    written = _output_ids(served.raw)
    thought = written[: written.index(_close_id(served.raw)) + 1]
    format_ = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}
    limit = LIMIT - len(thought)
    answer = _continued(served.raw, _prompt_ids(served.raw) + thought, limit, response_format=format_)
    assert answer.startswith('{"n":')
    for router in (served.parsed, served.disaggregated):
        parsed = _chat(router, response_format=format_).choices[0].message
        assert (parsed.model_dump()["reasoning_content"], parsed.content) == (thinking, answer)
    assert _streamed(_chat(served.parsed, response_format=format_, stream=True)) == (thinking, answer)
    text = {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA}}
    response = _respond(served.parsed, text=text)
    assert (response.output[0].content[0].text, response.output_text) == (thinking, answer)
    client = anthropic.Anthropic(base_url=served.parsed.http, api_key="unused", max_retries=0, timeout=60)
    message = client.messages.create(
        model=MODEL,
        max_tokens=LIMIT,
        messages=[{"role": "user", "content": QUESTION}],
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
        extra_body={"temperature": 0},  # as older SDKs send it
    )
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in message.content] == [
        ("thinking", thinking),
        ("text", answer),
    ]
    # Without the parser the grammar holds the output from its first token: no thinking, all JSON.
    raw = _chat(served.raw, response_format=format_).choices[0].message.content
    assert raw.startswith('{"n":') and CLOSE not in raw


def test_a_thinking_token_budget_closes_the_thinking_there(served):
    """vLLM's thinking_token_budget: after that many tokens of thinking </think> comes, and the answer follows it
    (the raw router's completion after the prompt, those tokens and </think>)."""
    written = _output_ids(served.raw)
    close = _close_id(served.raw)
    assert written.index(close) > 1, "the model thinks for more than one token"
    thinking = [written[0], close]
    answer = _continued(served.raw, _prompt_ids(served.raw) + thinking, LIMIT - 2)
    first = _continued(served.raw, _prompt_ids(served.raw), 1)
    for router in (served.parsed, served.disaggregated):  # the prefill worker's first token is the thinking's one
        chat = _chat(router, extra_body={"thinking_token_budget": 1})
        said = chat.choices[0].message
        assert (said.model_dump()["reasoning_content"], said.content) == (first, answer)
        assert chat.usage.completion_tokens_details.reasoning_tokens == 2
    metrics = httpx.get(f"{served.disaggregated.http}/metrics", timeout=10).text
    assert 'splitserve_routing_decisions_total{decision="remote_prefill"}' in metrics
    assert 'decision="local_prefill"' not in metrics and 'decision="fallback"' not in metrics
    budget_0 = _chat(served.disaggregated, extra_body={"thinking_token_budget": 0}).choices[0].message
    closed = _continued(served.raw, _prompt_ids(served.raw) + [close], LIMIT - 1)
    assert (budget_0.model_dump()["reasoning_content"], budget_0.content) == (None, closed)
    # The gRPC API's record carries it too (its text is as written, the thinking not split off).
    params = common_pb2.SamplingParams(max_tokens=LIMIT, thinking_token_budget=1, thinking=True)
    chat = generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content=QUESTION)])
    for router, told in ((served.parsed, None), (served.raw, "--reasoning-parser none")):
        with grpc.insecure_channel(router.grpc) as channel:
            stub = generate_pb2_grpc.GenerateStub(channel)
            request = generate_pb2.CompletionRequest(model=MODEL, chat=chat, params=params)
            if told is None:
                assert "".join(c.text for c in stub.Generate(request, timeout=60)) == f"{first}{CLOSE}{answer}"
                continue
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request, timeout=60))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and told in refused.value.details()
    refused = post(served.raw, "/v1/chat/completions", {**_BODY, "thinking_token_budget": 1})
    assert "--reasoning-parser none" in assert_error(refused, 400, param="thinking_token_budget")["message"]
    negative = post(served.parsed, "/v1/chat/completions", {**_BODY, "thinking_token_budget": -1})
    assert_error(negative, 400, param="thinking_token_budget")


_BODY = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}


def test_a_response_leads_with_its_thinking_as_a_reasoning_item_whole_and_streamed(served):
    thinking, answer = _raw_parts(served)
    response = _respond(served.parsed)
    reasoning, message = response.output
    assert (reasoning.type, reasoning.content[0].text, reasoning.status) == ("reasoning", thinking, response.status)
    assert (message.type, response.output_text) == ("message", answer)
    events = list(_respond(served.parsed, stream=True))
    deltas = {kind: "".join(e.delta for e in events if e.type == kind) for kind in _DELTAS}
    assert deltas == {"response.reasoning_text.delta": thinking, "response.output_text.delta": answer}
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == answer
    assert _respond(served.raw).output_text == f"{thinking}{CLOSE}{answer}"  # without the parser: as written
    # reasoning_tokens: the output's tokens up to its </think>, which the raw router's token ids show.
    raw = _chat(served.raw, logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    output_ids = token_ids([t.token for t in raw.choices[0].logprobs.content])
    close = httpx.post(
        f"{served.raw.http}/tokenize", json={"prompt": CLOSE, "add_special_tokens": False}, timeout=10
    ).json()["tokens"]
    reasoning_tokens = output_ids.index(close[0]) + 1
    assert response.usage.output_tokens_details.reasoning_tokens == reasoning_tokens > 1
    assert response.usage.output_tokens == len(output_ids)
    # A chat completion counts them where OpenAI's do, whole and in a stream's usage.
    chat = _chat(served.parsed, enable_thinking=True)
    assert chat.usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
    streamed = _chat(served.parsed, stream=True, stream_options={"include_usage": True})
    (usage,) = [chunk.usage for chunk in streamed if chunk.usage is not None]
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
    assert raw.usage.completion_tokens_details is None  # without the parser: not counted apart


def test_a_reasoning_item_sent_back_is_the_assistant_turns_reasoning_content(served):
    """A client that keeps the conversation itself (store false) sends the reasoning item back, as OpenAI's SDK
    guides: it reaches the template as the next assistant turn's reasoning_content. A stored response continued
    reads the same."""
    first = _respond(served.parsed, store=True)
    sent_back = [item.model_dump(exclude_none=True, exclude={"id"}) for item in first.output]  # ids are optional
    items = [{"role": "user", "content": QUESTION}, *sent_back]
    items.append({"role": "user", "content": "and 3 + 3?"})
    manual = _respond(served.parsed, input=items, store=False)
    said = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first.output_text, "reasoning_content": first.output[0].content[0].text},
        {"role": "user", "content": "and 3 + 3?"},
    ]
    rendered = httpx.post(f"{served.parsed.http}/tokenize", json={"messages": said}, timeout=10).json()["count"]
    assert manual.usage.input_tokens == rendered
    # A chat request's assistant message carries the same as reasoning_content, and answers alike.
    chat = served.parsed.openai().chat.completions.create(model=MODEL, messages=said, max_tokens=LIMIT, temperature=0)
    assert chat.usage.prompt_tokens == rendered
    thought, answer = chat.choices[0].message.model_dump()["reasoning_content"], chat.choices[0].message.content
    assert (manual.output[0].content[0].text, manual.output_text) == (thought, answer)
    wrong = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "reasoning_content": "x"}]}
    assert_error(post(served.parsed, "/v1/chat/completions", wrong), 400, param="messages.0.reasoning_content")
    continued = _respond(served.parsed, input="and 3 + 3?", previous_response_id=first.id)
    assert (continued.usage.input_tokens, continued.output_text) == (rendered, manual.output_text)


def test_a_message_leads_with_its_thinking_as_a_thinking_block_whole_and_streamed(served):
    """Anthropic's Messages API: the thinking is a thinking block (unsigned) before the text block, and streams as
    thinking_delta events in block 0, closed before the text's block 1 opens. A thinking block sent back in an
    assistant message is that turn's reasoning_content."""
    thinking, answer = _raw_parts(served)
    client = anthropic.Anthropic(base_url=served.parsed.http, api_key="unused", max_retries=0, timeout=60)
    greedy = {"temperature": 0}  # as older SDKs send it
    asked = dict(model=MODEL, max_tokens=LIMIT, messages=[{"role": "user", "content": QUESTION}], extra_body=greedy)
    message = client.messages.create(**asked)
    assert [b.model_dump() for b in message.content] == [
        {"type": "thinking", "thinking": thinking, "signature": ""},
        {"type": "text", "text": answer, "citations": None},
    ]
    events = list(client.messages.create(**asked, stream=True))
    blocks = [(e.index, e.content_block.type) for e in events if e.type == "content_block_start"]
    assert blocks == [(0, "thinking"), (1, "text")]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert stops == [0, 1]
    said = {
        kind: "".join(
            getattr(e.delta, field) for e in events if e.type == "content_block_delta" and e.delta.type == kind
        )
        for kind, field in (("thinking_delta", "thinking"), ("text_delta", "text"))
    }
    assert said == {"thinking_delta": thinking, "text_delta": answer}
    # Sent back: the assistant turn's reasoning_content, as a chat message carrying it renders.
    back = [
        *asked["messages"],
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
    ]
    back.append({"role": "user", "content": "and 3 + 3?"})
    counted = client.messages.count_tokens(model=MODEL, messages=back).input_tokens
    chat = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": answer, "reasoning_content": thinking},
        {"role": "user", "content": "and 3 + 3?"},
    ]
    assert counted == httpx.post(f"{served.parsed.http}/tokenize", json={"messages": chat}, timeout=10).json()["count"]


_DELTAS = ("response.reasoning_text.delta", "response.output_text.delta")


def test_anthropic_thinking_asks_the_template_and_bounds_the_thinking(served):
    """Anthropic's thinking field: enabled with budget_tokens thinks that many tokens, then </think>; adaptive is the
    model's own thinking; disabled asks the template not to open it (enable_thinking false, as a chat's
    chat_template_kwargs would), and count_tokens counts the prompt each asks for."""
    client = anthropic.Anthropic(base_url=served.parsed.http, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": QUESTION}]
    asked = dict(model=MODEL, max_tokens=LIMIT, messages=messages, extra_body={"temperature": 0})

    def blocks(**fields) -> list[tuple[str, str]]:
        message = client.messages.create(**asked, **fields)
        return [(b.type, b.thinking if b.type == "thinking" else b.text) for b in message.content]

    prompt = _prompt_ids(served.raw)
    first = _continued(served.raw, prompt, 1)
    thought = [_output_ids(served.raw)[0], _close_id(served.raw)]
    budgeted = [("thinking", first), ("text", _continued(served.raw, prompt + thought, LIMIT - 2))]
    assert blocks(thinking={"type": "enabled", "budget_tokens": 1}) == budgeted
    thinking, answer = _raw_parts(served)
    assert blocks(thinking={"type": "adaptive"}) == blocks() == [("thinking", thinking), ("text", answer)]
    unopened = _chat(served.raw, enable_thinking=False).choices[0].message.content
    assert blocks(thinking={"type": "disabled"}) == [("text", unopened)]
    said = {"messages": messages}
    tokenized = [
        httpx.post(f"{served.raw.http}/tokenize", json={**said, **kwargs}, timeout=10).json()["count"]
        for kwargs in ({}, {"chat_template_kwargs": {"enable_thinking": False}})
    ]
    counted = [
        client.messages.count_tokens(model=MODEL, messages=messages, **fields).input_tokens
        for fields in ({"thinking": {"type": "adaptive"}}, {"thinking": {"type": "disabled"}})
    ]
    assert counted == tokenized and tokenized[0] > tokenized[1]
    too_much = {"type": "enabled", "budget_tokens": LIMIT}
    with pytest.raises(anthropic.BadRequestError, match="thinking.budget_tokens must be less than max_tokens"):
        client.messages.create(**asked, thinking=too_much)


def test_a_reasoning_effort_of_none_is_no_thinking_and_other_levels_need_a_template_that_reads_one(served):
    """OpenAI's reasoning effort, on a template that reads none: "none" asks the template not to open the thinking
    (enable_thinking false, as Anthropic's disabled thinking does) and closes one opened anyway; "medium" (OpenAI's
    default) is the model's own thinking; another level is a 400 naming the field, as is a summary; a server without
    the parser takes "none" as asking nothing."""
    unopened = _chat(served.raw, enable_thinking=False).choices[0].message.content
    said = _chat(served.parsed, reasoning_effort="none").choices[0].message
    assert (said.model_dump()["reasoning_content"], said.content) == (None, unopened)
    response = _respond(served.parsed, reasoning={"effort": "none"})
    assert [item.type for item in response.output] == ["message"] and response.output_text == unopened
    assert response.reasoning.effort == "none"
    plain = _chat(served.raw).choices[0].message.content
    assert _chat(served.raw, reasoning_effort="none").choices[0].message.content == plain
    # "medium", OpenAI's default, is the model's own thinking (what a client sending the default asks).
    thinking, answer = _raw_parts(served)
    medium = _chat(served.parsed, reasoning_effort="medium").choices[0].message
    assert (medium.model_dump()["reasoning_content"], medium.content) == (thinking, answer)
    for router, body, param, says in (
        (served.parsed, {"reasoning_effort": "low"}, "reasoning_effort", "reads no reasoning_effort"),
        (served.raw, {"reasoning_effort": "high"}, "reasoning_effort", "--reasoning-parser none"),
        (served.parsed, {"reasoning_effort": "none", "thinking_token_budget": 3}, "reasoning_effort", "send one"),
        (
            served.parsed,
            {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}},
            "reasoning_effort",
            "may not differ",
        ),
    ):
        error = assert_error(post(router, "/v1/chat/completions", {**_BODY, **body}), 400, param=param)
        assert says in error["message"], error
    for reasoning, param in (({"effort": "low"}, "reasoning.effort"), ({"summary": "auto"}, "reasoning.summary")):
        body = {"model": MODEL, "input": QUESTION, "reasoning": reasoning}
        assert_error(post(served.parsed, "/v1/responses", body), 400, param=param)
