"""OpenAI's Responses API (``POST /v1/responses``) over the same generation as chat completions: what its request's
``input`` and ``instructions`` say as chat messages, and its answer's shape, whole or as the stream of typed events
OpenAI's SDKs read (``client.responses.create``, ``client.responses.stream``).

One assistant message per response, of one ``output_text`` part. Nothing is stored: ``store`` is false in every
answer, and what needs a stored response (``previous_response_id``, ``conversation``) is refused where the body is
read (router/openai_api.py), as are tools, reasoning and the other fields this server does not implement.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from contract.sampling import FieldError
from router.orchestrator import Delta, GenerationError

# An input message's role, as the chat template reads it (a developer message is the system prompt of chat models).
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = {"user": "input_text", "system": "input_text", "developer": "input_text", "assistant": "output_text"}
# OpenAI's metadata limits: what a client may attach, echoed back in the response.
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def messages(input_: str | list[dict[str, Any]], instructions: str | None) -> list[dict[str, str]]:
    """The chat messages the request's ``instructions`` and ``input`` (a text, or a list of message items) say;
    FieldError naming the item or part that is not a text message."""
    said = [{"role": "system", "content": instructions}] if instructions is not None else []
    if isinstance(input_, str):
        return [*said, {"role": "user", "content": input_}]
    if not input_:
        raise FieldError("input", "input must not be empty")
    for index, item in enumerate(input_):
        where = f"input.{index}"
        kind = item.get("type", "message")
        if kind != "message":
            raise FieldError(f"{where}.type", f"{where} is a {kind!r} item; only message items are supported")
        unknown = sorted(set(item) - {"type", "role", "content", "id", "status"})
        if unknown:
            raise FieldError(f"{where}.{unknown[0]}", f"{where}.{unknown[0]} is not supported")
        role = item.get("role")
        if role not in _ROLES:
            raise FieldError(f"{where}.role", f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}")
        said.append({"role": _ROLES[role], "content": _text(item.get("content"), _TEXT_PARTS[role], where)})
    return said


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
    status, text and usage as the generation ends."""

    def __init__(self, model: str, settings: dict[str, Any]) -> None:
        self.id = f"resp_{secrets.token_hex(24)}"
        self.message_id = f"msg_{secrets.token_hex(24)}"
        self.created_at = int(time.time())
        self.model = model
        self.settings = settings

    def response(
        self, status: str, text: str | None = None, usage: dict | None = None, error: dict | None = None
    ) -> dict:
        """The response object; ``text`` None: no output yet."""
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": [] if text is None else [self.message(_item_status(status), text)],
            "usage": usage,
            "store": False,
            "background": False,
            "previous_response_id": None,
            "tools": [],
            "tool_choice": "none",
            "parallel_tool_calls": False,
            "truncation": "disabled",
            **self.settings,
        }

    def message(self, status: str, text: str | None) -> dict:
        content = [] if text is None else [_output_text(text)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}


def _item_status(status: str) -> str:
    """The message item's status in a response of ``status``: cut short (at the limit, or failed) it is incomplete."""
    return "completed" if status == "completed" else "incomplete"


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def status_of(finish_reason: str | None) -> str:
    """A response's status from its one choice's finish: cut at its token limit, it is incomplete."""
    return "incomplete" if finish_reason == "length" else "completed"


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


async def events(
    shape: ResponseShape, deltas: AsyncIterator[Delta], prompt_tokens: int, error_body
) -> AsyncIterator[str]:
    """The SSE stream of a response: created, the message's item and part opened, a delta per piece of text, then
    everything closed and ``response.completed`` (``response.incomplete`` at the token limit). A generation that
    fails midway ends with an ``error`` event and ``response.failed`` naming why (``error_body``: OpenAI's error
    object of a GenerationError)."""
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        sequence += 1
        payload = {"type": kind, "sequence_number": sequence - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    where = {"item_id": shape.message_id, "output_index": 0}
    yield event("response.created", response=shape.response("in_progress"))
    yield event("response.in_progress", response=shape.response("in_progress"))
    yield event("response.output_item.added", output_index=0, item=shape.message("in_progress", None))
    yield event("response.content_part.added", **where, content_index=0, part=_output_text(""))
    texts, output_tokens, cached, finish = [], 0, 0, None
    try:
        async for delta in deltas:
            output_tokens += len(delta.token_ids)
            if delta.usage is not None:
                cached = max(cached, delta.usage.cached_tokens)
            finish = delta.finish_reason or finish
            if delta.text:
                texts.append(delta.text)
                yield event("response.output_text.delta", **where, content_index=0, delta=delta.text, logprobs=[])
    except (GenerationError, TimeoutError) as exc:
        failure = exc if isinstance(exc, GenerationError) else GenerationError("request timed out", 504, "timeout")
        error = error_body(failure)["error"]
        yield event("error", code=error["code"], message=error["message"], param=error["param"])
        failed = {"code": "server_error", "message": error["message"]}
        yield event("response.failed", response=shape.response("failed", "".join(texts), error=failed))
        return
    text, status = "".join(texts), status_of(finish)
    yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
    yield event("response.content_part.done", **where, content_index=0, part=_output_text(text))
    yield event("response.output_item.done", output_index=0, item=shape.message(_item_status(status), text))
    final = shape.response(status, text, usage(prompt_tokens, output_tokens, cached))
    yield event(f"response.{status}", response=final)
