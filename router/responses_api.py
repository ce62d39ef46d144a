"""OpenAI's Responses API (``POST /v1/responses``) over the same generation as chat completions: what its request's
``instructions`` and ``input`` items say as chat turns (messages; function_call and function_call_output items as an
assistant's tool calls and their results), its function tools as chat's, and its answer's shape, whole or as the
stream of typed events OpenAI's SDKs read (``client.responses.create``, ``client.responses.stream``).

The output is one assistant message and, with tools, a function_call item per call the model made. What a stored
response keeps, and how a later one continues it, is router/stored_responses.py's; built-in tools, reasoning,
``conversation`` and the other fields this server does not implement are refused where the body is read
(router/openai_api.py).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from contract.sampling import FieldError
from protos import common_pb2
from router import reasoning
from router.orchestrator import Delta, GenerationError, failure
from router.structured import ToolCall, Tools

# An input message's roles, each with its text part's type (a developer message takes the role the chat template
# gives it: router/structured.py).
_TEXT_PARTS = {"user": "input_text", "system": "input_text", "developer": "input_text", "assistant": "output_text"}
# OpenAI's metadata limits: what a client may attach, echoed back in the response.
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
# What ``include`` may ask for: the output text's logprobs (the rest names outputs of tools this server has not).
LOGPROBS_INCLUDE = "message.output_text.logprobs"

# The output text's logprobs as OpenAI writes them (each token's text, bytes, logprob and top_logprobs).
Logprobs = Callable[[Sequence[common_pb2.TokenLogprob]], list[dict]]


def messages(
    input_: str | list[dict[str, Any]], instructions: str | None, earlier: Sequence[dict[str, Any]] = ()
) -> list[dict[str, str]]:
    """The chat messages the request's ``instructions`` and ``input`` (a text, or a list of message items) say, after
    the ``earlier`` items of the response it continues (which were checked when they came); FieldError naming the
    input item or part that is not a text message."""
    said = [{"role": "system", "content": instructions}] if instructions is not None else []
    if isinstance(input_, str):
        input_ = [{"role": "user", "content": input_}]
    elif not input_:
        raise FieldError("input", "input must not be empty")
    # A reasoning item's text: the reasoning_content of the assistant turn right after it (a message or a call). A
    # client's item that leads none is refused; an earlier response's, cut short while it thought, is left out.
    thought, thought_at = None, None
    for index, item in enumerate([*earlier, *input_]):
        where = f"input.{index - len(earlier)}"
        kind = item.get("type", "message")
        if thought is not None and not (kind == "function_call" or item.get("role") == "assistant"):
            _unled(thought_at)
            thought = None
        if kind == "reasoning":
            thought, thought_at = _thought(item, where), where if index >= len(earlier) else None
            continue
        if kind in _CALL_ITEMS:
            turn = _call_turn(item, kind, where)
            if thought is not None and "tool_calls" in turn:
                turn["reasoning_content"], thought = thought, None
            previous = said[-1] if said else {}
            if turn.get("tool_calls") and previous.get("tool_calls") and previous.get("content") is None:
                previous["tool_calls"].extend(turn["tool_calls"])  # calls in a row: one assistant turn
            else:
                said.append(turn)
            continue
        if kind != "message":
            raise FieldError(
                f"{where}.type",
                f"{where} is a {kind!r} item; only message, reasoning, function_call and function_call_output",
            )
        unknown = sorted(set(item) - {"type", "role", "content", "id", "status"})
        if unknown:
            raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
        role = item.get("role")
        if role not in _TEXT_PARTS:
            raise FieldError(f"{where}.role", f"{where}.role must be one of {', '.join(_TEXT_PARTS)}; got {role!r}")
        said.append({"role": role, "content": _text(item.get("content"), _TEXT_PARTS[role], where)})
        if thought is not None and role == "assistant":
            said[-1]["reasoning_content"], thought = thought, None
    if thought is not None:
        _unled(thought_at)
    return said


def _unled(where: str | None) -> None:
    """A reasoning item with no assistant turn right after it: refused where it is the client's (``where``)."""
    if where is not None:
        raise FieldError(where, f"{where}: a reasoning item must lead the assistant message or call right after it")


def _thought(item: dict, where: str) -> str:
    """A reasoning item's text (its reasoning_text parts'), which the chat template reads as the next assistant
    turn's ``reasoning_content`` (a reasoning model's renders it where it keeps thinking; others leave it out)."""
    unknown = sorted(set(item) - {"type", "id", "summary", "content", "status", "encrypted_content"})
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
    if item.get("encrypted_content"):
        raise FieldError(f"{where}.encrypted_content", f"{where}: encrypted reasoning is another server's to read")
    if item.get("summary"):  # this server's own items have none: a summary is not the thinking the model saw
        raise FieldError(f"{where}.summary", f"{where}.summary: the thinking is read from content (reasoning_text)")
    parts = item.get("content") or []
    if not isinstance(parts, list) or not all(
        isinstance(p, dict) and p.get("type") == "reasoning_text" and isinstance(p.get("text"), str) for p in parts
    ):
        raise FieldError(f"{where}.content", f"{where}.content must be a list of reasoning_text parts")
    return "".join(part["text"] for part in parts)


def input_items(input_: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input (which ``messages`` checked) as a stored response's input items: each with an id, a
    message's text as its one part."""
    listed = [{"role": "user", "content": input_}] if isinstance(input_, str) else input_
    items = []
    for item in listed:
        kind = item.get("type", "message")
        stored = {"type": kind, **item, "id": item.get("id") or f"{_ITEM_ID_PREFIXES[kind]}_{secrets.token_hex(24)}"}
        if kind == "message" and isinstance(item["content"], str):
            stored["content"] = [{"type": _TEXT_PARTS[item["role"]], "text": item["content"]}]
        items.append(stored)
    return items


_ITEM_ID_PREFIXES = {"message": "msg", "reasoning": "rs", "function_call": "fc", "function_call_output": "fco"}


# An earlier turn's function call, and its result: the chat template's assistant tool_calls and tool message.
_CALL_ITEMS = {
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
}


def _call_turn(item: dict, kind: str, where: str) -> dict:
    """The chat turn a function_call or function_call_output item is."""
    unknown = sorted(set(item) - _CALL_ITEMS[kind])
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
    wanted = ("call_id", "name", "arguments") if kind == "function_call" else ("call_id", "output")
    for key in wanted:
        if not isinstance(item.get(key), str):
            raise FieldError(f"{where}.{key}", f"{where}.{key} must be a string")
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
    function = {"name": item["name"], "arguments": item["arguments"]}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": item["call_id"], "type": "function", "function": function}],
    }


def _text(content: Any, part_type: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(f"{where}.content", f"{where}.content must be a string or a list of {part_type} parts")
    texts = []
    for index, part in enumerate(content):
        here = f"{where}.content.{index}"
        if not isinstance(part, dict) or part.get("type") != part_type or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise FieldError(here, f"{here} is {kind!r}; only {part_type} parts ({{'type', 'text'}}) are supported")
        extra = set(part) - {"type", "text", "annotations", "logprobs"}
        if extra or part.get("annotations") or part.get("logprobs"):
            raise FieldError(here, f"{here} may hold only its type and text")
        texts.append(part["text"])
    return "".join(texts)


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """OpenAI's limits on the metadata a response carries back; FieldError naming ``metadata``."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise FieldError("metadata", f"metadata has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise FieldError(
                "metadata",
                f"metadata keys may have {MAX_METADATA_KEY_CHARS} characters and values {MAX_METADATA_VALUE_CHARS}; "
                f"{key[:MAX_METADATA_KEY_CHARS]!r} has more",
            )
    return metadata


class ResponseShape:
    """One response's answer: its fixed fields (the request's settings, echoed as OpenAI echoes them), then its
    status, output items and usage as the generation ends."""

    def __init__(
        self,
        model: str,
        settings: dict[str, Any],
        logprobs: Logprobs | None = None,
        thinking: reasoning.Thinking | None = None,
    ) -> None:
        """``logprobs``: writes the output text's logprobs, when the request includes them. ``thinking``: with a
        reasoning parser, the output's thinking (router/reasoning.py), which then leads the output as a reasoning
        item; None: the text as written."""
        self.id = f"resp_{secrets.token_hex(24)}"
        self.message_id = f"msg_{secrets.token_hex(24)}"
        self.reasoning_id = f"rs_{secrets.token_hex(24)}"
        self.thinking = thinking
        self.created_at = int(time.time())
        self.model = model
        self.settings = settings
        self._logprobs = logprobs

    def response(
        self, status: str, output: list[dict] | None = None, usage: dict | None = None, error: dict | None = None
    ) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output or [],
            "usage": usage,
            **self.settings,
        }

    def finished(self, generated: Generated, prompt_tokens: int, tools: Tools | None) -> dict:
        """The response once its generation ended: its status, output items (with tools, the calls read out of the
        text) and usage."""
        thinking, text = reasoning.split(self.thinking, generated.text)
        calls = []
        if tools is not None and tools.parses:
            content, calls = tools.parse(text)
            text = content or ""
        status = generated.status
        output = self.output(status, text, calls, generated.logprobs, thinking)
        reasoning_tokens = self.thinking.tokens(generated.token_ids) if self.thinking is not None else 0
        return self.response(status, output, generated.usage(prompt_tokens, reasoning_tokens))

    def failed(self, generated: Generated, message: str, held: bool = False) -> dict:
        """The response of a generation that failed with ``message``, holding the text it gave (none when the text
        was ``held`` for function calls to be read out of it)."""
        error = {"code": "server_error", "message": message}
        return self.response("failed", self._cut_short("failed", generated, held), error=error)

    def cancelled(self, generated: Generated, prompt_tokens: int, held: bool = False) -> dict:
        """The response of a background generation cancelled midway: what it gave, as ``failed``, and its usage."""
        return self.response("cancelled", self._cut_short("cancelled", generated, held), generated.usage(prompt_tokens))

    def _cut_short(self, status: str, generated: Generated, held: bool) -> list[dict]:
        thinking, text = reasoning.split(self.thinking, generated.text)
        output = self.output(status, text, logprobs=generated.logprobs, thinking=thinking)
        if held:  # what the model wrote was not read for calls: only its thinking is
            output = [item for item in output if item["type"] == "reasoning"]
        return output

    def output(
        self,
        status: str,
        text: str,
        calls: list[ToolCall] = (),
        logprobs: Sequence[common_pb2.TokenLogprob] = (),
        thinking: str = "",
    ) -> list[dict]:
        """The output items: the thinking (if any), the message (unless the model only called functions), then one
        item per call. ``logprobs``: the text's tokens' (a response with tools has none: a call is no text)."""
        items = [self.reasoning_item(_item_status(status), thinking)] if thinking else []
        if text or not calls:
            items.append(self.message(_item_status(status), self.text_part(text, logprobs)))
        return items + [function_call(call) for call in calls]

    def reasoning_item(self, status: str, thinking: str | None) -> dict:
        """A reasoning item, its text as its one reasoning_text part (none yet: ``thinking`` None)."""
        content = [] if thinking is None else [{"type": "reasoning_text", "text": thinking}]
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}

    def message(self, status: str, part: dict | None) -> dict:
        content = [] if part is None else [part]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def text_part(self, text: str, logprobs: Sequence[common_pb2.TokenLogprob] = ()) -> dict:
        """An output_text content part; its logprobs are the tokens' when the request includes them."""
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs(logprobs)}

    def logprobs(self, logprobs: Sequence[common_pb2.TokenLogprob]) -> list[dict]:
        return self._logprobs(logprobs) if self._logprobs is not None else []


def function_call(call: ToolCall) -> dict:
    """A function_call output item (its ``call_id`` is what a function_call_output item answers)."""
    return {
        "type": "function_call",
        "id": f"fc_{call.id.removeprefix('call_')}",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": "completed",
    }


def _item_status(status: str) -> str:
    """The message item's status in a response of ``status``: cut short (at the limit, or failed) it is incomplete."""
    return "completed" if status == "completed" else "incomplete"


@dataclass
class Generated:
    """What a response's generation has given so far."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)  # when the request asked for them
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        self.token_ids.extend(delta.token_ids)
        if delta.usage is not None:
            self.cached_tokens = max(self.cached_tokens, delta.usage.cached_tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def status(self) -> str:
        """Cut at its token limit, a response is incomplete."""
        return "incomplete" if self.finish_reason == "length" else "completed"

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)

    def usage(self, prompt_tokens: int, reasoning_tokens: int = 0) -> dict:
        """``reasoning_tokens``: the output's thinking's (its tags included), which output_tokens counts too."""
        return {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + self.output_tokens,
        }


SERVER_FAULT = "the server failed this response (its log says why)"


async def events(
    shape: ResponseShape,
    deltas: AsyncIterator[Delta],
    prompt_tokens: int,
    error_body,
    tools: Tools | None = None,
    ended: Callable[[dict], None] = lambda response: None,
    background: bool = False,
    generated: Generated | None = None,
) -> AsyncIterator[str]:
    """The SSE stream of a response: created; the message's item and part opened, a delta per piece of text, all
    closed; then ``response.completed`` (``response.incomplete`` at the token limit). With tools, the text is held
    to its end, where calls are read out of it: each output item then opens, fills and closes in turn (a call's
    arguments as one delta). A generation that fails midway ends with an ``error`` event and ``response.failed``
    (``error_body``: OpenAI's error object of a GenerationError); in the background, so does a fault of the
    server's own (SERVER_FAULT), which is then raised for the caller to log. ``ended`` gets the last event's response.
    ``background``: the response is created queued (``response.queued``), in progress from its first token;
    ``generated``: what the deltas add up to, kept where the caller reads it."""
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        sequence += 1
        payload = {"type": kind, "sequence_number": sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    held = tools is not None and tools.parses
    splitter = reasoning.splitter(shape.thinking)
    opened: list[str] = []  # the items streaming, in output order ("reasoning", "message"): each one's index

    def where(kind: str) -> dict:
        item_id = shape.message_id if kind == "message" else shape.reasoning_id
        return {"item_id": item_id, "output_index": opened.index(kind), "content_index": 0}

    def open_item(kind: str) -> Iterator[str]:
        opened.append(kind)
        item = shape.message("in_progress", None) if kind == "message" else shape.reasoning_item("in_progress", None)
        part = shape.text_part("") if kind == "message" else {"type": "reasoning_text", "text": ""}
        yield event("response.output_item.added", output_index=len(opened) - 1, item=item)
        yield event("response.content_part.added", **where(kind), part=part)

    started = False

    def start() -> Iterator[str]:
        nonlocal started
        if started:
            return
        started = True
        yield event("response.in_progress", response=shape.response("in_progress"))
        if not held and splitter is None:  # the text is the message's from its first token
            yield from open_item("message")

    created = "queued" if background else "in_progress"
    yield event("response.created", response=shape.response(created))
    if background:
        yield event("response.queued", response=shape.response(created))
    else:
        for said in start():
            yield said
    generated = Generated() if generated is None else generated
    try:
        async for delta in deltas:
            for said in start():
                yield said
            generated.add(delta)
            thinking, text = reasoning.pieces(splitter, delta.text, bool(delta.finish_reason))
            if thinking:
                for said in open_item("reasoning") if "reasoning" not in opened else ():
                    yield said
                yield event("response.reasoning_text.delta", **where("reasoning"), delta=thinking)
            if (text or delta.logprobs) and not held:  # a token may end inside a character: no text yet
                for said in open_item("message") if "message" not in opened else ():
                    yield said
                logprobs = shape.logprobs(delta.logprobs)
                yield event("response.output_text.delta", **where("message"), delta=text, logprobs=logprobs)
    except Exception as exc:
        ours = not isinstance(exc, (GenerationError, TimeoutError))  # a fault of this server's, not of the request
        if ours and not background:
            raise  # the client's connection breaks; the route logs why
        for said in start():
            yield said
        error = error_body(GenerationError(SERVER_FAULT, 500, "server_error") if ours else failure(exc))["error"]
        yield event("error", code=error["code"], message=error["message"], param=error["param"])
        failed = shape.failed(generated, error["message"], held)
        ended(failed)
        yield event("response.failed", response=failed)
        if ours:
            raise  # the background task logs it, once its followers have the end
        return
    for said in start():
        yield said
    final = shape.finished(generated, prompt_tokens, tools)
    for index, item in enumerate(final["output"]):
        kind = item["type"]
        if kind in ("message", "reasoning"):
            part = item["content"][0]
            if kind not in opened:  # held to the end (or no text came): opened and filled now
                for said in open_item(kind):
                    yield said
                text_delta = {"delta": part["text"]} | ({"logprobs": part["logprobs"]} if kind == "message" else {})
                yield event(_TEXT_EVENTS[kind] + ".delta", **where(kind), **text_delta)
            done = {"text": part["text"]} | ({"logprobs": part["logprobs"]} if kind == "message" else {})
            yield event(_TEXT_EVENTS[kind] + ".done", **where(kind), **done)
            yield event("response.content_part.done", **where(kind), part=part)
        else:
            call = {"item_id": item["id"], "output_index": index}
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            )
            yield event("response.function_call_arguments.delta", **call, delta=item["arguments"])
            yield event("response.function_call_arguments.done", **call, arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    ended(final)
    yield event(f"response.{final['status']}", response=final)


_TEXT_EVENTS = {"message": "response.output_text", "reasoning": "response.reasoning_text"}
