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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from contract.sampling import FieldError
from protos import common_pb2
from router.orchestrator import Delta, GenerationError
from router.structured import ToolCall, Tools

# An input message's role, as the chat template reads it (a developer message is the system prompt of chat models).
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
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
    for index, item in enumerate([*earlier, *input_]):
        where = f"input.{index - len(earlier)}"
        kind = item.get("type", "message")
        if kind in _CALL_ITEMS:
            turn = _call_turn(item, kind, where)
            previous = said[-1] if said else {}
            if turn.get("tool_calls") and previous.get("tool_calls") and previous.get("content") is None:
                previous["tool_calls"].extend(turn["tool_calls"])  # calls in a row: one assistant turn
            else:
                said.append(turn)
            continue
        if kind != "message":
            raise FieldError(
                f"{where}.type", f"{where} is a {kind!r} item; only message, function_call and function_call_output"
            )
        unknown = sorted(set(item) - {"type", "role", "content", "id", "status"})
        if unknown:
            raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
        role = item.get("role")
        if role not in _ROLES:
            raise FieldError(f"{where}.role", f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}")
        said.append({"role": _ROLES[role], "content": _text(item.get("content"), _TEXT_PARTS[role], where)})
    return said


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


_ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


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

    def __init__(self, model: str, settings: dict[str, Any], logprobs: Logprobs | None = None) -> None:
        """``logprobs``: writes the output text's logprobs, when the request includes them."""
        self.id = f"resp_{secrets.token_hex(24)}"
        self.message_id = f"msg_{secrets.token_hex(24)}"
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
        text, calls = generated.text, []
        if tools is not None and tools.parses:
            content, calls = tools.parse(text)
            text = content or ""
        status = generated.status
        output = self.output(status, text, calls, generated.logprobs)
        return self.response(status, output, generated.usage(prompt_tokens))

    def failed(self, generated: Generated, message: str, held: bool = False) -> dict:
        """The response of a generation that failed with ``message``, holding the text it gave (none when the text
        was ``held`` for function calls to be read out of it)."""
        output = [] if held else self.output("failed", generated.text, logprobs=generated.logprobs)
        return self.response("failed", output, error={"code": "server_error", "message": message})

    def output(
        self, status: str, text: str, calls: list[ToolCall] = (), logprobs: Sequence[common_pb2.TokenLogprob] = ()
    ) -> list[dict]:
        """The output items: the message (unless the model only called functions), then one item per call.
        ``logprobs``: the text's tokens' (a response with tools has none: a call is no text)."""
        items = [self.message(_item_status(status), self.text_part(text, logprobs))] if text or not calls else []
        return items + [function_call(call) for call in calls]

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
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        self.output_tokens += len(delta.token_ids)
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

    def usage(self, prompt_tokens: int) -> dict:
        return {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + self.output_tokens,
        }


async def events(
    shape: ResponseShape,
    deltas: AsyncIterator[Delta],
    prompt_tokens: int,
    error_body,
    tools: Tools | None = None,
    ended: Callable[[dict], None] = lambda response: None,
) -> AsyncIterator[str]:
    """The SSE stream of a response: created; the message's item and part opened, a delta per piece of text, all
    closed; then ``response.completed`` (``response.incomplete`` at the token limit). With tools, the text is held
    to its end, where calls are read out of it: each output item then opens, fills and closes in turn (a call's
    arguments as one delta). A generation that fails midway ends with an ``error`` event and ``response.failed``
    (``error_body``: OpenAI's error object of a GenerationError). ``ended`` gets the last event's response."""
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        sequence += 1
        payload = {"type": kind, "sequence_number": sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    held = tools is not None and tools.parses
    where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=shape.response("in_progress"))
    yield event("response.in_progress", response=shape.response("in_progress"))
    if not held:
        yield event("response.output_item.added", output_index=0, item=shape.message("in_progress", None))
        yield event("response.content_part.added", **where, part=shape.text_part(""))
    generated = Generated()
    try:
        async for delta in deltas:
            generated.add(delta)
            if (delta.text or delta.logprobs) and not held:  # a token may end inside a character: no text yet
                logprobs = shape.logprobs(delta.logprobs)
                yield event("response.output_text.delta", **where, delta=delta.text, logprobs=logprobs)
    except (GenerationError, TimeoutError) as exc:
        error = error_body(failure(exc))["error"]
        yield event("error", code=error["code"], message=error["message"], param=error["param"])
        failed = shape.failed(generated, error["message"], held)
        ended(failed)
        yield event("response.failed", response=failed)
        return
    final = shape.finished(generated, prompt_tokens, tools)
    for index, item in enumerate(final["output"]):
        if item["type"] == "message":
            part = item["content"][0]
            text = part["text"]
            if held:
                yield event("response.output_item.added", output_index=index, item=shape.message("in_progress", None))
                yield event("response.content_part.added", **where, part=shape.text_part(""))
                yield event("response.output_text.delta", **where, delta=text, logprobs=part["logprobs"])
            yield event("response.output_text.done", **where, text=text, logprobs=part["logprobs"])
            yield event("response.content_part.done", **where, part=part)
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


def failure(exc: GenerationError | TimeoutError) -> GenerationError:
    """What ended a generation, as the GenerationError its error body is written from."""
    return exc if isinstance(exc, GenerationError) else GenerationError("request timed out", 504, "timeout")
