"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) over the same generation as
chat completions: its ``system`` and ``messages`` as chat turns (``tool_use`` blocks as an assistant's tool calls,
``tool_result`` blocks as their results), its client tools as chat's, its answer in the Messages shape (a reasoning
model's thinking block, text, then a ``tool_use`` block per call the model made), whole or as the stream of events
Anthropic's SDKs read (``client.messages.create``, ``client.messages.stream``), its errors in Anthropic's error shape.
Server tools, images and the other fields this server does not implement are refused where the body is read
(router/openai_api.py), each by name.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from contract import grammar as specs
from contract.grammar import Grammar
from contract.sampling import FieldError
from router import reasoning
from router.orchestrator import Delta, GenerationError, failure
from router.structured import ToolCall, Tools

PATHS = ("/v1/messages", "/v1/messages/count_tokens")
MAX_TEMPERATURE = 1.0  # Anthropic's range is [0, 1]
_ROLES = ("user", "assistant")
# A text block's keys: cache_control asks to cache the prompt up to it, which the prefix cache does for every prompt.
_TEXT_BLOCK_KEYS = {"type", "text", "cache_control", "citations"}
# Anthropic's error types by HTTP status (its SDKs raise by status; the type names it in the body).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is the Messages API's (its errors in Anthropic's shape), one this server serves or not
    (``/v1/messages/batches``: a 404 an Anthropic SDK reads)."""
    return path == PATHS[0] or path.startswith(f"{PATHS[0]}/")


def error_body(message: str, status: int) -> dict:
    """Anthropic's error object: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def conversation(system: str | list[dict] | None, messages: list[dict]) -> list[dict]:
    """The chat turns that ``system`` and ``messages`` say: an assistant's ``tool_use`` blocks as its tool calls, a
    user's ``tool_result`` blocks as tool messages before its text; FieldError naming the message or block that is
    none of these. (router/structured.py's tool_turns then checks that each result answers an earlier call.)"""
    said = [] if system is None else [{"role": "system", "content": _text(system, "system")}]
    if not messages:
        raise FieldError("messages", "messages must not be empty")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise FieldError(where, f"{where} must be an object with role and content")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise FieldError(f"{where}.role", f"{where}.role must be user or assistant; got {role!r}")
        if content in ("", []) and not (role == "assistant" and index == len(messages) - 1):
            # As Anthropic's API: an empty turn says nothing to the model, and only a final assistant turn (the
            # answer's start) may be empty.
            raise FieldError(f"{where}.content", f"{where}.content must not be empty (only a final assistant may be)")
        said.extend(_turns(role, content, f"{where}.content"))
    return said


def _turns(role: str, content: Any, where: str) -> list[dict]:
    """The chat turns of one message: tool results (a user's) first, then its text with any tool calls (an
    assistant's)."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise FieldError(where, f"{where} must be a string or a list of content blocks")
    texts, calls, results, thoughts = [], [], [], []
    for index, block in enumerate(content):
        here = f"{where}.{index}"
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        if kind == "text":
            texts.append(_text([block], where, index))
        elif kind == "thinking" and role == "assistant":
            thoughts.append(_thinking(block, here))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, here))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, here))
        else:
            allowed = "thinking, text and tool_use" if role == "assistant" else "text and tool_result"
            raise FieldError(here, f"{here} is a {kind!r} block; {role} messages may hold {allowed} blocks")
    turns = list(results)
    if calls:
        turns.append({"role": role, "content": "".join(texts) or None, "tool_calls": calls})
    elif texts or not results:
        turns.append({"role": role, "content": "".join(texts)})
    if thoughts:  # the turn's thinking: the chat template's to render (router/reasoning.py)
        turns[-1]["reasoning_content"] = "".join(thoughts)
    return turns


def _thinking(block: dict, where: str) -> str:
    """An assistant's earlier thinking block's text (its signature, if any, is not checked: this server signs none)."""
    unknown = sorted(set(block) - {"type", "thinking", "signature"})
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
    if not isinstance(block.get("thinking"), str):
        raise FieldError(f"{where}.thinking", f"{where}.thinking must be a string")
    return block["thinking"]


def _tool_use(block: dict, where: str) -> dict:
    """An assistant's earlier call, as chat's tool call (its input as the arguments' JSON text)."""
    unknown = sorted(set(block) - {"type", "id", "name", "input", "cache_control"})
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
    for key in ("id", "name"):
        if not isinstance(block.get(key), str):
            raise FieldError(f"{where}.{key}", f"{where}.{key} must be a string")
    if not isinstance(block.get("input"), dict):
        raise FieldError(f"{where}.input", f"{where}.input must be an object")
    function = {"name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}
    return {"id": block["id"], "type": "function", "function": function}


def _tool_result(block: dict, where: str) -> dict:
    """A tool's result, as chat's tool message. ``is_error`` is accepted: the result's text is what the model
    reads either way, as a chat template renders a tool result."""
    unknown = sorted(set(block) - {"type", "tool_use_id", "content", "is_error", "cache_control"})
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
    if not isinstance(block.get("tool_use_id"), str):
        raise FieldError(f"{where}.tool_use_id", f"{where}.tool_use_id must be a string")
    check_cache_control(block.get("cache_control"), f"{where}.cache_control")
    content = block.get("content", "")
    text = content if isinstance(content, str) else _text(content, f"{where}.content")
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _text(content: Any, where: str, first: int = 0) -> str:
    """A string, or the text of a list of text blocks (``first``: the index of the list's first block in ``where``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(where, f"{where} must be a string or a list of text blocks")
    texts = []
    for index, block in enumerate(content, first):
        here = f"{where}.{index}"
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        if kind != "text" or not isinstance(block.get("text"), str):
            raise FieldError(here, f"{here} is a {kind!r} block; only text blocks are supported")
        if set(block) - _TEXT_BLOCK_KEYS or block.get("citations"):
            raise FieldError(here, f"{here} may hold only its type, text and cache_control")
        check_cache_control(block.get("cache_control"), f"{here}.cache_control")
        if not block["text"]:
            raise FieldError(f"{here}.text", f"{here}.text must not be empty: text blocks hold text")
        texts.append(block["text"])
    return "".join(texts)


def check_cache_control(value: Any, where: str) -> None:
    """A prompt-caching marker, ``{"type": "ephemeral", "ttl": "5m" | "1h"}``: a hint, since the prefix cache keeps
    every prompt's blocks while its pool holds them."""
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type") != "ephemeral" or set(value) - {"type", "ttl"}:
        raise FieldError(where, f'{where} must be {{"type": "ephemeral"}}, with a ttl of "5m" or "1h"')
    if value.get("ttl", "5m") not in ("5m", "1h"):
        raise FieldError(where, f'{where}.ttl must be "5m" or "1h"')


def output_format(config: dict[str, Any] | None) -> Grammar | None:
    """The grammar of ``output_config``'s format (a JSON schema the output follows); FieldError naming what else
    it asks for (an effort, which the served model has no levels of)."""
    config = config or {}
    unknown = sorted(set(config) - {"format", "effort"})
    if unknown or config.get("effort") is not None:
        name = unknown[0] if unknown else "effort"
        raise FieldError(f"output_config.{name}", f"output_config.{name} is not supported")
    form = config.get("format")
    if form is None:
        return None
    if not isinstance(form, dict) or form.get("type") != "json_schema" or set(form) != {"type", "schema"}:
        raise FieldError("output_config.format", 'output_config.format must be {"type": "json_schema", "schema": ...}')
    return specs.json_schema(form["schema"], "output_config.format.schema")


def thinking_asked(
    thinking: dict[str, Any] | None, thinks: bool, template_variables: frozenset[str]
) -> reasoning.ThinkingAsked:
    """``thinking`` as Anthropic spells it: ``{"type": "enabled", "budget_tokens": n}`` thinks at most n tokens,
    ``{"type": "adaptive"}`` as long as the model does, ``{"type": "disabled"}`` not at all (a thinking the model
    opens anyway is closed at once). ``thinks``: the server reads the model's thinking (--reasoning-parser); a
    model that does not think is only ever asked not to. FieldError naming what is malformed or cannot be done."""
    if thinking is None:
        return reasoning.ThinkingAsked({})
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    keys = {"enabled": {"type", "budget_tokens"}, "adaptive": {"type"}, "disabled": {"type"}}.get(kind)
    if keys is None:
        raise FieldError("thinking.type", 'thinking.type must be "enabled", "adaptive" or "disabled"')
    unknown = sorted(set(thinking) - keys)
    if unknown:
        raise FieldError(f"thinking.{unknown[0]}", f"thinking.{unknown[0]} is not supported with {kind} thinking")
    if kind == "disabled":
        return reasoning.no_thinking(thinks, template_variables)
    if not thinks:
        raise FieldError("thinking", f"thinking: {reasoning.NOT_THINKING}")
    enabled = reasoning.ThinkingAsked({"enable_thinking": True} if "enable_thinking" in template_variables else {})
    if kind == "adaptive":
        return enabled
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise FieldError("thinking.budget_tokens", "thinking.budget_tokens must be a positive integer")
    return replace(enabled, budget=budget)


def check_metadata(metadata: dict[str, Any] | None) -> None:
    """Anthropic's metadata holds a user_id (an end user's id, kept as metadata: it changes nothing generated)."""
    unknown = sorted(set(metadata or {}) - {"user_id"})
    if unknown:
        raise FieldError(f"metadata.{unknown[0]}", f"metadata.{unknown[0]} is not supported: metadata holds user_id")
    user_id = (metadata or {}).get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise FieldError("metadata.user_id", "metadata.user_id must be a string")


def _stop(finish_reason: str | None, stop_reason: str | int | None) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) of a generation that ended with ``finish_reason``."""
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


@dataclass
class Message:
    """One answer: its id and model, then what its generation gave. With ``tools`` that parse the output, its calls
    are read out of the text at the end."""

    model: str
    input_tokens: int
    tools: Tools | None = None
    # With a reasoning parser: the output's thinking, which then leads the answer as a thinking block
    # (router/reasoning.py); None: the text as written.
    thinking: reasoning.Thinking | None = None
    id: str = field(default_factory=lambda: f"msg_{secrets.token_hex(12)}")
    texts: list[str] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def held(self) -> bool:
        """Whether the text is held to the end, where calls are read out of it."""
        return self.tools is not None and self.tools.parses

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        self.output_tokens += len(delta.token_ids)
        if delta.usage is not None:
            self.cached_tokens = max(self.cached_tokens, delta.usage.cached_tokens)
        if delta.finish_reason:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    def usage(self) -> dict:
        """Anthropic counts the prompt tokens read from the cache apart from the input tokens."""
        return {
            "input_tokens": self.input_tokens - self.cached_tokens,
            "cache_read_input_tokens": self.cached_tokens,
            "cache_creation_input_tokens": 0,
            "output_tokens": self.output_tokens,
        }

    def content(self) -> tuple[list[dict], tuple[str, str | None]]:
        """The finished answer's content blocks (its text, then a tool_use block per call) and its
        (stop_reason, stop_sequence)."""
        thought, text = reasoning.split(self.thinking, "".join(self.texts))
        uses = []
        if self.held:
            content, calls = self.tools.parse(text)
            uses = [_tool_use_block(call) for call in calls]
            if None in uses:  # arguments that are no JSON object: no call, the text as written
                uses = []
            else:
                text = content or ""
        blocks = [_thinking_block(thought)] if thought else []
        blocks += [{"type": "text", "text": text}] if text else []
        stop = ("tool_use", None) if uses else _stop(self.finish_reason, self.stop_reason)
        return blocks + uses, stop

    def whole(self) -> dict:
        content, (stop_reason, stop_sequence) = self.content()
        return {**self.start(), "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence}

    def start(self) -> dict:
        """The message as it begins: no content, no stop reason yet."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self.usage(),
        }


def _thinking_block(thinking: str) -> dict:
    """A thinking block; unsigned (a signature is Anthropic's proof that its own model thought it)."""
    return {"type": "thinking", "thinking": thinking, "signature": ""}


def _tool_use_block(call: ToolCall) -> dict | None:
    try:
        arguments = json.loads(call.arguments)
    except (json.JSONDecodeError, RecursionError):  # nested past what Python parses
        return None
    if not isinstance(arguments, dict):
        return None
    return {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.name, "input": arguments}


async def events(message: Message, deltas: AsyncIterator[Delta], error_message) -> AsyncIterator[str]:
    """The SSE stream of an answer: message_start; a text block once there is text (its start, a text_delta per
    piece, its stop), or with tools the text held to the end, where each block of the answer opens, fills and closes
    in turn (a tool_use block's input as one input_json_delta); message_delta with the stop reason and the whole
    usage; message_stop. The blocks are those the whole answer has (an answer without text has no text block). A
    generation that fails midway ends with an ``error`` event (``error_message``: the client's message of a
    GenerationError)."""

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"

    splitter = reasoning.splitter(message.thinking)
    streamed: list[str] = []  # the blocks streamed so far, by index ("thinking", "text"): the last one is open

    def open_block(kind: str) -> list[str]:
        said = [event("content_block_stop", index=len(streamed) - 1)] if streamed else []
        streamed.append(kind)
        block = {"type": "text", "text": ""} if kind == "text" else _thinking_block("")
        return [*said, event("content_block_start", index=len(streamed) - 1, content_block=block)]

    yield event("message_start", message=message.start())
    yield event("ping")
    try:
        async for delta in deltas:
            message.add(delta)
            thinking, text = reasoning.pieces(splitter, delta.text, bool(delta.finish_reason))
            if thinking:
                for said in open_block("thinking") if "thinking" not in streamed else ():
                    yield said
                said = {"type": "thinking_delta", "thinking": thinking}
                yield event("content_block_delta", index=streamed.index("thinking"), delta=said)
            if text and not message.held:
                for said in open_block("text") if "text" not in streamed else ():
                    yield said
                index = streamed.index("text")
                yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})
    except (GenerationError, TimeoutError) as exc:
        ended = failure(exc)
        yield event("error", error=error_body(error_message(ended), ended.status)["error"])
        return
    content, (stop_reason, stop_sequence) = message.content()
    if streamed:
        yield event("content_block_stop", index=len(streamed) - 1)
    for index, block in enumerate(content[len(streamed) :], len(streamed)):
        if block["type"] == "text":
            yield event("content_block_start", index=index, content_block={"type": "text", "text": ""})
            yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": block["text"]})
        else:
            yield event("content_block_start", index=index, content_block={**block, "input": {}})
            partial = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
            yield event("content_block_delta", index=index, delta=partial)
        yield event("content_block_stop", index=index)
    # The usage so far, whole: message_start's counted the prompt before the prefix cache said what it held.
    usage = message.usage()
    yield event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence}, usage=usage)
    yield event("message_stop")
