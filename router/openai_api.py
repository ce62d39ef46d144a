"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, health.

Every error leaves in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.metadata
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match

from contract.errors import check_request_id, fields_named
from contract.grammar import Grammar
from contract.sampling import (
    DEFAULT_MAX_TOKENS,
    FieldError,
    SamplingParams,
    check_text,
    check_token_ids,
    logprobs_count,
    wrap_seed,
)
from contract.sampling import FIELDS as SAMPLING_FIELDS
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from protos import common_pb2
from router import anthropic_api, reasoning, responses_api
from router.config import cors_origin_list
from router.frontend import Frontend, Overloaded, log_access, serving
from router.json_route import JsonBodyRoute
from router.orchestrator import Delta, GenerationError, GenerationRequest, failure
from router.stored_responses import ENDED, ResponseStore, Stored
from router.structured import (
    ANTHROPIC,
    CHAT,
    CHAT_ROLES,
    RESPONSES,
    Tools,
    grammar_from_fields,
    text_format,
    tool_call_format,
    tool_turns,
)

log = logging.getLogger(__name__)

# -- request bodies -----------------------------------------------------------------------------------
#
# Every field of every request model is honoured or refused (tests/router/test_request_fields.py walks the models
# and fails on a field missing from these tables). Unknown fields are refused too (extra="forbid"), each with a
# 400 naming it. Metadata fields are honoured as metadata: accepted, and they change nothing generated.

_SAMPLING_HONOURED = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "n",
        "stream",
        "stream_options",
        "ignore_eos",
        "return_tokens_as_token_ids",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "allowed_token_ids",
        "user",
        "logit_bias",
        "min_tokens",
        "truncate_prompt_tokens",
        "add_special_tokens",
        "prompt_logprobs",
        "bad_words",
        "priority",
        "thinking_token_budget",
        "request_id",
        # structured output (router/structured.py): one grammar from any one of these
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
    }
)
METADATA = frozenset({"user", "safety_identifier", "prompt_cache_key"})
COMPLETION_HONOURED = _SAMPLING_HONOURED | {"prompt", "max_tokens", "logprobs", "echo", "best_of"}
CHAT_HONOURED = _SAMPLING_HONOURED | {
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "safety_identifier",
    "prompt_cache_key",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "documents",
    "reasoning_effort",
}
MESSAGE_HONOURED = frozenset({"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"})
STREAM_OPTIONS_HONOURED = frozenset({"include_usage", "continuous_usage_stats"})


@dataclass(frozen=True)
class Refusal:
    """A known field this server does not implement. Values in ``neutral`` ask for nothing and are accepted
    (clients often send a field's default); any other value is a 400 naming the field."""

    detail: str = ""
    neutral: tuple = (None,)

    def refuses(self, value: Any) -> bool:
        return not any(type(value) is type(n) and value == n for n in self.neutral)


_NOT_STRUCTURED = Refusal("structured output takes response_format, guided_* or structured_outputs")
_SAMPLING_REFUSED: dict[str, Refusal] = {
    "guided_decoding_backend": _NOT_STRUCTURED,
    "guided_whitespace_pattern": _NOT_STRUCTURED,
    "structural_tag": _NOT_STRUCTURED,
    "use_beam_search": Refusal(neutral=(None, False)),
    "length_penalty": Refusal(neutral=(None, 1, 1.0)),
    # true, vLLM's default that clients send, is what the tokenizer does with the special tokens' texts it keeps
    "spaces_between_special_tokens": Refusal("special tokens are decoded as the tokenizer joins them", (None, True)),
    "logits_processors": Refusal(),
}
COMPLETION_REFUSED: dict[str, Refusal] = {
    **_SAMPLING_REFUSED,
    # Insertion needs fill-in-the-middle tokens and training; the served Llama-family models have neither.
    "suffix": Refusal("the served model has no fill-in-the-middle support", neutral=(None, "")),
}
_NO_TOOLS = "use tools and tool_choice (the deprecated function-calling fields are not implemented)"
CHAT_REFUSED: dict[str, Refusal] = {
    **_SAMPLING_REFUSED,
    "echo": Refusal(neutral=(None, False)),
    "functions": Refusal(_NO_TOOLS, neutral=(None, [])),
    "function_call": Refusal(_NO_TOOLS, neutral=(None, "none")),
    "audio": Refusal(),
    "modalities": Refusal(neutral=(None, ["text"])),
    "prediction": Refusal(),
    "verbosity": Refusal(),
    "web_search_options": Refusal(),
    "store": Refusal("completions are not stored", neutral=(None, False)),
    "metadata": Refusal("completions are not stored", neutral=(None, {})),
    "service_tier": Refusal(neutral=(None, "auto", "default")),
    "chat_template": Refusal("the model's own chat template is used"),
    "mm_processor_kwargs": Refusal(),
}
MESSAGE_REFUSED: dict[str, Refusal] = {
    "function_call": Refusal(_NO_TOOLS),
    "refusal": Refusal(),
    "audio": Refusal(),
}
STREAM_OPTIONS_REFUSED: dict[str, Refusal] = {}


class _Strict(BaseModel):
    """Unknown fields are a 400; every string must be valid UTF-8 (JSON escapes can carry lone surrogates).

    Values are of their field's JSON type (strict: ``true`` is no integer, ``"3"`` no number, ``1`` no boolean), but
    for a JSON integer where a number is wanted. A known field's null means "not given", as OpenAI reads it (its
    SDK sends null for a parameter passed as None): the field keeps its declared default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @field_validator("*")
    @classmethod
    def _utf8(cls, value: Any, info: ValidationInfo) -> Any:
        if not _valid_utf8(value):
            raise PydanticCustomError("invalid_utf8", "{field} is not valid UTF-8", {"field": info.field_name})
        return value


def _valid_utf8(value: Any) -> bool:
    """Whether every string in ``value`` encodes (no lone surrogate), walked without recursion."""
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(value, dict):
            pending.extend(value)
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(v for v in value if type(v) is not int)  # token ids: not one pop per id
    return True


def _refusing(name: str, base: type[BaseModel], refused: dict[str, Refusal]) -> type[BaseModel]:
    """``base`` with the ``refused`` fields added: typed Any, so that any value reaches the refusal."""

    def refuse(cls, value: Any, info: ValidationInfo) -> Any:
        refusal = refused[info.field_name]
        if refusal.refuses(value):
            detail = f": {refusal.detail}" if refusal.detail else ""
            raise PydanticCustomError(
                "unsupported_field", "{field} is not supported{detail}", {"field": info.field_name, "detail": detail}
            )
        return value

    return create_model(
        name,
        __base__=base,
        __validators__={"_refuse": field_validator(*refused)(refuse)},
        **{field: (Any, None) for field in refused},
    )


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage and no choices
    continuous_usage_stats: bool = False  # usage, so far, on every chunk (vLLM's extension)


class _SamplingFields(_Strict):
    model: str | None = None
    request_id: str | None = None  # vLLM's: the client's name for the request, as X-Request-Id is (_name_request)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's extension: logprob tokens as "token_id:N"
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias in [-100, 100]
    min_tokens: int = 0  # vLLM's extension: no EOS, stop token or stop string before this many tokens
    skip_special_tokens: bool = True  # vLLM's: false keeps special tokens' text (EOS's with include_stop_str_in_output)
    include_stop_str_in_output: bool = False  # vLLM's: the text ends with the stop string (or stop token) that ended it
    allowed_token_ids: list[int] = Field(default=[], min_length=1)  # vLLM's: only these may be sampled (unset: any)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's: {"json" | "regex" | "choice" | "grammar" | ...: ...}
    # vLLM's: at most this many tokens of thinking, then </think> (a reasoning model's: --reasoning-parser)
    thinking_token_budget: int | None = None
    # vLLM's: keep the prompt's last n tokens (-1: as many as the context holds); text echoed is then theirs
    truncate_prompt_tokens: int | None = None
    priority: int = 0  # vLLM's: the request's place in the router's queue, lower first (scheduling_policy priority)
    bad_words: list[str] | None = None  # vLLM's: words never generated (contract/sampling.py)
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob, rank and the n most likely (not streamed)
    add_special_tokens: bool | None = None  # the tokenizer's BOS/EOS around the prompt (default: completions only)

    def prompt_tokens(self, frontend: Frontend, prompts: list[list[int]]) -> list[list[int]]:
        """``prompts`` cut to ``truncate_prompt_tokens`` (their tails); FieldError names it when out of range."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return prompts
        limit = frontend.max_model_len
        if keep != -1 and not 1 <= keep <= limit:
            raise FieldError(
                "truncate_prompt_tokens", f"truncate_prompt_tokens must be -1 (the context, {limit}) or in [1, {limit}]"
            )
        keep = limit if keep == -1 else keep
        return [p[-keep:] for p in prompts]

    def sampling(
        self,
        max_tokens: int,
        logprobs: int | None,
        grammar: Grammar | None = None,
        defaulted: bool = False,
        budget: int | None = None,
    ) -> SamplingParams:
        """The sampling record; fields named as in the record pass through. FieldError names a bad one.
        ``grammar`` (a tool_choice's) stands for the structured-output fields, which then must be unset.
        ``defaulted``: the client set no max_tokens (the engine may lower ``max_tokens`` to fit its KV pool).
        ``budget``: the thinking's, where another field asks one (chat's reasoning_effort none) for the body's
        thinking_token_budget."""
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise FieldError("prompt_logprobs", "prompt_logprobs are not returned when stream is true")
        same = {name: getattr(self, name) for name in _record_fields(type(self))}
        same.update(stop=() if self.stop is None else self.stop, stop_token_ids=tuple(self.stop_token_ids or ()))
        budget = self.thinking_token_budget if budget is None else budget
        same.update(bad_words=tuple(self.bad_words or ()), thinking=budget is not None, thinking_token_budget=budget)
        same.update(logit_bias=_logit_bias_ids(self.logit_bias or {}), min_tokens=self.min_tokens)
        asked = grammar_from_fields(self)
        if grammar is not None and asked is not None:
            raise FieldError("tool_choice", "a required or named tool_choice constrains the output already")
        limits = {"max_tokens": max_tokens, "max_tokens_defaulted": defaulted}
        return SamplingParams(**{**same, **limits, "logprobs": logprobs, "grammar": grammar or asked})


@cache
def _record_fields(body: type[_SamplingFields]) -> tuple[str, ...]:
    """The sampling record's fields that a request body has under the same names (once per body class)."""
    return tuple(name for name in SAMPLING_FIELDS if name in body.model_fields)


class CompletionBody(_refusing("_CompletionRefused", _SamplingFields, COMPLETION_REFUSED)):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = DEFAULT_MAX_TOKENS  # 0: nothing generated (with echo and logprobs: the prompt scored)
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion; with logprobs, the prompt tokens' logprobs too
    best_of: int | None = Field(default=None, ge=1, le=16)  # candidates per prompt; the n most likely are returned


def _logit_bias_ids(bias: dict[str, float]) -> list[tuple[int, float]]:
    """JSON's string keys as token ids (ASCII digits: ``str.isdigit`` would take "²"), in pairs, so that two keys
    of one id ("28", "028") reach the record, which refuses them; FieldError(logit_bias) for a key that is no id."""
    pairs = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise FieldError("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        pairs.append((int(key), value))
    return pairs


class ChatMessageBody(_refusing("_ChatMessageRefused", _Strict, MESSAGE_REFUSED)):
    role: Literal[CHAT_ROLES]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[Any] | None = None  # an assistant's earlier calls; checked by router/structured.py
    tool_call_id: str | None = None  # the call a tool message answers
    name: str | None = None  # the participant's: to the template, refused where it renders none (ChatTemplate.render)
    # An assistant turn's thinking (what --reasoning-parser returned): to the template, which renders it where the
    # model keeps thinking (a reasoning model's, within the turn) or leaves it out
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class _Rendering(_Strict):
    """How a conversation becomes the prompt (vLLM's fields; ``Tokenizer.apply_chat_template`` implements them)."""

    add_generation_prompt: bool | None = None  # default: open the assistant's turn unless continuing the last one
    continue_final_message: bool = False  # the last (assistant) message stays open for the model to continue
    chat_template_kwargs: dict[str, Any] | None = None  # variables the model's chat template reads
    documents: list[dict[str, Any]] | None = None  # retrieved passages, for a chat template that renders them


class ChatBody(_refusing("_ChatRefused", _SamplingFields, CHAT_REFUSED), _Rendering):
    messages: list[ChatMessageBody] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a hint: prefixes are cached whether or not it is given
    tools: list[Any] | None = None  # checked by router/structured.py, each error naming its place
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None  # router/reasoning.py effort_asked

    def thinking(self, frontend: Frontend) -> reasoning.ThinkingAsked:
        variables = frontend.tokenizer.template_variables
        asked = reasoning.effort_asked(self.reasoning_effort, "reasoning_effort", frontend.thinks, variables)
        if asked.budget is not None and self.thinking_token_budget is not None:
            raise FieldError("reasoning_effort", "reasoning_effort none and thinking_token_budget: send one")
        return asked


RESPONSES_REFUSED: dict[str, Refusal] = {
    "conversation": Refusal("conversations are not kept; continue a stored response with previous_response_id"),
    "prompt": Refusal("prompt templates are stored ones; send input"),
    "max_tool_calls": Refusal("the model makes the calls of one turn; the client runs them"),
    "service_tier": Refusal(neutral=(None, "auto", "default")),
    "stream_options": Refusal("events are never obfuscated", neutral=(None, {}, {"include_obfuscation": False})),
    "prompt_cache_retention": Refusal(),
}
RESPONSES_HONOURED = METADATA | {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "text",
    "metadata",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "include",
    "top_logprobs",
    "store",
    "previous_response_id",
    "background",
    "truncation",
    "reasoning",
}


class ResponsesBody(_refusing("_ResponsesRefused", _Strict, RESPONSES_REFUSED)):
    """OpenAI's Responses API (router/responses_api.py): text in, one assistant message out; stored by default, to
    be continued, read back or run in the background (router/stored_responses.py)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None  # a system message before the input
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    text: dict[str, Any] | None = None  # {"format": ...}: structured output (router/structured.py text_format)
    metadata: dict[str, str] | None = None  # echoed back in the response
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    tools: list[Any] | None = None  # function tools, flat (router/structured.py Tools.from_request)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None  # only responses_api.LOGPROBS_INCLUDE: the output text's logprobs
    top_logprobs: int | None = None  # with those logprobs, the most likely tokens at each place (0 to 20)
    store: bool | None = None  # None: as OpenAI, true (where the router keeps a store: responses_store_mb)
    previous_response_id: str | None = None  # the stored response whose conversation this one continues
    background: bool = False  # answered at once, queued; the client polls GET /v1/responses/{id}
    # "auto": a conversation too long for the context loses its earliest turns; "disabled" (the default): a 400
    truncation: Literal["auto", "disabled"] = "disabled"
    reasoning: dict[str, Any] | None = None  # {"effort": ...}: router/reasoning.py effort_asked

    def thinking(self, frontend: Frontend) -> reasoning.ThinkingAsked:
        """What ``reasoning`` asks of the thinking; summaries are not made (the reasoning comes back whole)."""
        asked = self.reasoning or {}
        unknown = sorted(set(asked) - {"effort", "summary", "generate_summary"})
        if unknown:
            raise FieldError(f"reasoning.{unknown[0]}", f"reasoning.{unknown[0]} is not supported")
        for name in ("summary", "generate_summary"):
            if asked.get(name) is not None:
                raise FieldError(
                    f"reasoning.{name}", "reasoning summaries are not made: the reasoning comes back whole, as text"
                )
        variables = frontend.tokenizer.template_variables
        return reasoning.effort_asked(asked.get("effort"), "reasoning.effort", frontend.thinks, variables)

    def stored(self, store: ResponseStore) -> bool:
        """Whether the response is stored; FieldError naming what the store cannot do for this request."""
        stored = store.enabled if self.store is None else self.store
        store.check(stored, self.background, self.previous_response_id)
        return stored

    def logprobs(self, tools: Tools | None) -> int | None:
        """The record's logprobs: None unless ``include`` asks for them (then ``top_logprobs``'s count); FieldError
        naming what else include asks for, or what cannot be had (logprobs of text that function calls are read
        out of: ``tools``, when they parse the output)."""
        wanted = set(self.include or ())
        unknown = sorted(wanted - {responses_api.LOGPROBS_INCLUDE})
        if unknown:
            raise FieldError(
                "include", f"include {unknown[0]!r} is not supported: only {responses_api.LOGPROBS_INCLUDE!r}"
            )
        if responses_api.LOGPROBS_INCLUDE not in wanted:
            if self.top_logprobs:
                raise FieldError("top_logprobs", f"top_logprobs needs include [{responses_api.LOGPROBS_INCLUDE!r}]")
            return None
        if tools is not None and tools.parses:
            raise FieldError("include", "logprobs are not returned with function tools: calls are read out of the text")
        return logprobs_count(self.top_logprobs or 0, "top_logprobs")

    def sampling(
        self, room: int, tool_grammar: Grammar | None, logprobs: int | None, thinking: reasoning.ThinkingAsked
    ) -> SamplingParams:
        """The record; a limit out of range is refused naming max_output_tokens (the record calls it max_tokens).
        ``tool_grammar``: a required or named tool_choice's, which text.format then must not constrain too;
        ``thinking``: reasoning's budget."""
        limit = room if self.max_output_tokens is None else self.max_output_tokens
        asked = text_format(self.text)
        if tool_grammar is not None and asked is not None:
            raise FieldError("tool_choice", "a required or named tool_choice constrains the output already")
        with fields_named({"max_tokens": "max_output_tokens"}):
            return SamplingParams(
                max_tokens=limit,
                max_tokens_defaulted=self.max_output_tokens is None,
                temperature=self.temperature,
                top_p=self.top_p,
                grammar=tool_grammar or asked,
                logprobs=logprobs,
                thinking=thinking.budget is not None,
                thinking_token_budget=thinking.budget,
            )

    def echoed(self, stored: bool) -> dict[str, Any]:
        """The request's settings as a response carries them back."""
        return {
            "store": stored,
            "background": self.background,
            "previous_response_id": self.previous_response_id,
            "truncation": self.truncation,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "text": {"format": (self.text or {}).get("format") or {"type": "text"}},
            "metadata": responses_api.check_metadata(self.metadata or {}),
            "user": self.user,
            "safety_identifier": self.safety_identifier,
            "prompt_cache_key": self.prompt_cache_key,
            "tools": self.tools or [],
            "tool_choice": self.tool_choice or ("auto" if self.tools else "none"),
            "parallel_tool_calls": True if self.parallel_tool_calls is None else self.parallel_tool_calls,
            "top_logprobs": self.top_logprobs,
            "reasoning": {"effort": (self.reasoning or {}).get("effort"), "summary": None},
        }


ANTHROPIC_REFUSED: dict[str, Refusal] = {
    "mcp_servers": Refusal(neutral=(None, [])),
    "container": Refusal(),
    "context_management": Refusal(),
    "service_tier": Refusal(neutral=(None, "auto", "standard_only")),
    "speed": Refusal(neutral=(None, "standard")),
    "inference_geo": Refusal(),
    "diagnostics": Refusal(),
}
ANTHROPIC_HONOURED = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "metadata",
        "cache_control",
        "output_config",
        "tools",
        "tool_choice",
        "thinking",
    }
)


class _AnthropicPrompt(_Strict):
    model: str
    messages: list[Any]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None  # client tools (router/structured.py Tools.from_request, Anthropic's shape)
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # a reasoning model's (anthropic_api.thinking_asked)

    def said(self, frontend: Frontend) -> tuple[list[dict], Tools | None]:
        """The chat turns and the tools of the request; FieldError naming what is malformed."""
        choice = self.tool_choice or {}
        parallel = choice.get("disable_parallel_tool_use", False)
        if not isinstance(parallel, bool):
            raise FieldError("tool_choice.disable_parallel_tool_use", "disable_parallel_tool_use must be a boolean")
        tools = _tools(frontend, self.tools, self.tool_choice, not parallel, ANTHROPIC)
        said = anthropic_api.conversation(self.system, self.messages)
        try:
            said = tool_turns(said, frontend.tokenizer)
        except FieldError as exc:  # named as in the chat turns, which are not the messages' places
            raise FieldError("messages", f"the tool turns in messages do not add up: {exc}") from None
        return said, tools

    def prompt(self, frontend: Frontend) -> tuple[list[int], Tools | None, reasoning.ThinkingAsked]:
        """The prompt (and what it asks of the tools and the thinking); a last assistant message of text is the start
        of the answer, which the model continues (as Anthropic's API prefills a response), where chat would close it
        and open a new turn."""
        said, tools = self.said(frontend)
        thinking = anthropic_api.thinking_asked(self.thinking, frontend.thinks, frontend.tokenizer.template_variables)
        final = said[-1]
        prefilled = final["role"] == "assistant" and not final.get("tool_calls")
        template_tools = tools.template_tools if tools else None
        prompt = frontend.encode_chat(
            said, template_tools, continue_final_message=prefilled, template_kwargs=thinking.template_kwargs
        )
        return prompt, tools, thinking


class AnthropicBody(_refusing("_AnthropicRefused", _AnthropicPrompt, ANTHROPIC_REFUSED)):
    """Anthropic's Messages API (router/anthropic_api.py): text in, one assistant message out."""

    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float = 1.0  # Anthropic's range: [0, 1]
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stream: bool = False
    metadata: dict[str, Any] | None = None  # {"user_id": ...}: metadata, changes nothing generated
    cache_control: dict[str, Any] | None = None  # a hint: every prompt's prefix is cached while the pool holds it
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", "schema": ...}}: structured

    def sampling(self, tools: Tools | None, thinking: reasoning.ThinkingAsked) -> SamplingParams:
        """The record; ``tools``' grammar (a tool_choice of any or one tool) or output_config's format, and
        ``thinking``'s budget."""
        tool_grammar = tools.grammar() if tools else None
        budget = thinking.budget
        if budget is not None and budget >= self.max_tokens:
            raise FieldError("thinking.budget_tokens", "thinking.budget_tokens must be less than max_tokens")
        asked = anthropic_api.output_format(self.output_config)
        if tool_grammar is not None and asked is not None:
            raise FieldError("tool_choice", "a tool_choice of any or one tool constrains the output already")
        if not 0 <= self.temperature <= anthropic_api.MAX_TEMPERATURE:  # NaN too
            raise FieldError("temperature", f"temperature must lie in [0, {anthropic_api.MAX_TEMPERATURE}]")
        anthropic_api.check_metadata(self.metadata)
        anthropic_api.check_cache_control(self.cache_control, "cache_control")
        with fields_named({"stop": "stop_sequences"}):
            return SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                stop=tuple(self.stop_sequences or ()),
                grammar=tool_grammar or asked,
                thinking=budget is not None,
                thinking_token_budget=budget,
            )


ANTHROPIC_COUNT_REFUSED = {name: ANTHROPIC_REFUSED[name] for name in ("mcp_servers",)}
ANTHROPIC_COUNT_HONOURED = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking"})


class AnthropicCountBody(_refusing("_AnthropicCountRefused", _AnthropicPrompt, ANTHROPIC_COUNT_REFUSED)):
    """Anthropic's count_tokens: the prompt tokens its Messages request would have."""


class TokenizeBody(_Rendering):
    """vLLM's /tokenize: ``prompt`` (special tokens added unless ``add_special_tokens`` is false) or ``messages``
    (rendered with the chat template as a chat completion's are; special tokens added only if
    ``add_special_tokens`` is true)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None
    add_special_tokens: bool | None = None


class DetokenizeBody(_Strict):
    model: str | None = None
    tokens: list[int]


TOKENIZE_HONOURED = frozenset(TokenizeBody.model_fields)
DETOKENIZE_HONOURED = frozenset(DetokenizeBody.model_fields)


# -- documented error responses: the OpenAPI document lists every status a route answers with ----------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape; every error leaves in it, but the Messages API's."""

    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """Anthropic's error shape: every error of the Messages API's routes leaves in it (``_Answer`` rewrites them)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


_ERROR_MEANINGS = {
    400: "Invalid request: a field is malformed, out of range or not supported (``error.param`` names it)",
    401: "Missing or incorrect API key",
    404: "No such model (or, where the path names one, no such stored response)",
    413: "Request body too large",
    429: "Too many requests in flight; retry after the Retry-After header's seconds",
    499: "The client disconnected before the answer (no one receives this)",
    502: "A worker failed the request",
    503: "No model is served yet, or no decode worker is ready",
    504: "The request timed out",
}


def errors(*statuses: int, path: str = "") -> dict[int | str, dict]:
    """``responses=`` of a route answering with ``statuses`` (401 and 413 apply to every guarded route), in the
    error shape of its API (``path``: the route's, where it is the Messages API's)."""
    body = AnthropicErrorBody if anthropic_api.is_anthropic(path) else ErrorBody
    return {status: {"model": body, "description": _ERROR_MEANINGS[status]} for status in statuses}


# The routes that generate: one owner for what counts as a generation request (the dashboard's request rates).
GENERATING_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages")
_GUARDED = (401, 413)
_GENERATING_STATUSES = (400, *_GUARDED, 404, 429, 499, 502, 503, 504)


# -- the app ------------------------------------------------------------------------------------------


def create_app(frontend: Frontend, api_keys: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(
        title="splitserve",
        version="0.1.0",
        description="OpenAI-compatible API of a disaggregated LLM serving cluster",
        # HTTP spans have one owner, router/tracing.py (OTEL_* variables). FastAPI's own telemetry (0.165 on) would
        # be a second one, reading OpenTelemetry's global providers on every request to decide it has nothing to do.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.frontend = frontend
    _install_errors(app)
    _install_guards(app, frontend, api_keys)
    _document_errors_honestly(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "Not ready (same body: what is missing)"}})
    async def ready():
        ready = frontend.ready
        body = {
            "ready": ready,
            "stopping": frontend.stopping,  # a stop began: still serving through its delay, then refusing
            "decode_workers": len(frontend.pool.of_role("decode")),
            "prefill_workers": len(frontend.pool.of_role("prefill")),
            "model": frontend.model.describe(),
            "incompatible_workers": [
                {"address": w.address, "role": w.role, "reason": w.incompatible.reason, "fields": w.incompatible.fields}
                for w in frontend.pool.incompatible()
            ],
            # Every worker not routed to, with why (incompatible, draining, or what took it out).
            "unavailable_workers": frontend.pool.unavailable(),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(frontend.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=errors(*_GUARDED))
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(frontend)]}

    def generating(path: str):
        # The routes nearly every request is for take the short request path (router/json_route.py).
        assert path in GENERATING_PATHS, path

        def add(endpoint):
            documented = errors(*_GENERATING_STATUSES, path=path)
            app.router.add_api_route(
                path, endpoint, methods=["POST"], responses=documented, route_class_override=JsonBodyRoute
            )
            return endpoint

        return add

    @generating("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        frontend.check_model(body.model)
        _name_request(request, body.request_id)
        sent = _completion_prompts(frontend, body.prompt, body.add_special_tokens is not False)
        prompts = body.prompt_tokens(frontend, sent)
        # Text is echoed as sent, unless truncate_prompt_tokens cut it: then the tokens kept, decoded.
        cut = prompts != sent
        texts = (
            _prompt_texts(frontend, prompts if cut else body.prompt, prompts)
            if body.echo or body.logprobs is not None
            else None
        )
        shape = _Completions.of(body, prompts, texts, cut)
        defaulted = "max_tokens" not in body.model_fields_set
        params = body.sampling(shape.worker_max_tokens, shape.worker_logprobs(body.logprobs), defaulted=defaulted)
        if body.echo and body.logprobs is not None:
            if body.prompt_logprobs not in (None, body.logprobs):
                raise FieldError("prompt_logprobs", "with echo and logprobs, prompt_logprobs must equal logprobs")
            params = replace(params, prompt_logprobs=body.logprobs)
        frontend.admission.check_fits(len(prompts), shape.best_of, "n" if body.best_of is None else "best_of")
        # Choice i * best_of + j is prompt i's j-th candidate: seeded alike whatever the prompt's place in the list.
        candidates = _seeded(params, shape.best_of)
        jobs = [frontend.build(p, candidate, priority=body.priority) for p in prompts for candidate in candidates]
        return await _respond(request, frontend, body, jobs, "text_completion", "cmpl", completions=shape)

    @app.get("/v1/models/{model_id:path}", responses=errors(*_GUARDED, 404))
    async def model(model_id: str) -> dict:
        if model_id != frontend.model_name:
            raise GenerationError(f"The model `{model_id}` does not exist.", 404, "model_not_found", "model")
        return _model_card(frontend)

    @app.post("/tokenize", responses=errors(400, *_GUARDED, 404, 503))
    async def tokenize(body: TokenizeBody) -> dict:
        frontend.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise FieldError("prompt", "give either prompt or messages")
        if body.prompt is not None:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = frontend.tokenizer.encode(check_text(body.prompt, "prompt"), add_special_tokens=add_special)
        else:
            tokens = _rendered(frontend, body, body.messages)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": frontend.max_model_len}

    @app.post("/detokenize", responses=errors(400, *_GUARDED, 404, 503))
    async def detokenize(body: DetokenizeBody) -> dict:
        frontend.check_model(body.model)
        check_token_ids(body.tokens, frontend.vocab_size, "tokens")
        return {"prompt": frontend.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/version", responses=errors(*_GUARDED))
    async def version() -> dict:
        return {"version": importlib.metadata.version("splitserve")}

    @generating("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        frontend.check_model(body.model)
        _name_request(request, body.request_id)
        tools = _chat_tools(frontend, body)
        asked = body.thinking(frontend)
        template_kwargs = reasoning.with_template_kwargs(asked, body.chat_template_kwargs, "reasoning_effort")
        rendered = _rendered(frontend, body, body.messages, tools.template_tools if tools else None, template_kwargs)
        (prompt,) = body.prompt_tokens(frontend, [rendered])
        frontend.admission.check_fits(1, body.n, "n")
        if body.top_logprobs is not None and not body.logprobs:
            raise GenerationError(
                "top_logprobs requires logprobs to be true", 400, "invalid_request_error", "top_logprobs"
            )
        logprobs = logprobs_count(body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
        limit_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(body, limit_field)
        if body.max_tokens not in (None, max_tokens):  # one limit, said twice: the two must agree
            raise FieldError(
                "max_tokens",
                f"max_tokens ({body.max_tokens}) and max_completion_tokens ({max_tokens}) disagree; send one",
            )
        tool_grammar = tools.grammar() if tools else None
        room = frontend.room(prompt, "messages") if max_tokens is None else max_tokens
        params = body.sampling(room, logprobs, tool_grammar, defaulted=max_tokens is None, budget=asked.budget)
        jobs = [
            frontend.build(prompt, choice, "messages", limit_field, body.priority) for choice in _seeded(params, body.n)
        ]
        calls = tools if tools is not None and tools.parses else None
        thinking = frontend.thinking(prompt)
        return await _respond(request, frontend, body, jobs, "chat.completion", "chatcmpl", calls, thinking=thinking)

    @generating("/v1/responses")
    async def responses(body: ResponsesBody, request: Request):
        frontend.check_model(body.model)
        store = frontend.responses
        stored = body.stored(store)
        owner = _owner(request)
        previous = body.previous_response_id
        earlier = store.previous(previous, owner).history if previous is not None else []
        said = responses_api.messages(body.input, body.instructions, earlier)
        tools = _responses_tools(frontend, body)
        asked = body.thinking(frontend)
        prompt = _responses_prompt(frontend, said, tools, asked.template_kwargs)
        items = [*earlier, *responses_api.input_items(body.input)]  # what its input_items list, when stored
        if body.truncation == "auto":
            prompt = _truncated(frontend, body, items, tools, prompt, asked.template_kwargs)
        logprobs = body.logprobs(tools)
        params = body.sampling(frontend.room(prompt, "input"), tools.grammar() if tools else None, logprobs, asked)
        thinking = frontend.thinking(prompt)
        if thinking is not None and logprobs is not None:
            raise FieldError("include", "logprobs are not returned with --reasoning-parser: the text is split")
        job = frontend.build(prompt, params, "input", "max_output_tokens")
        names = _TokenNames(frontend, False, None)
        written = (lambda lps: _chat_logprobs(names, lps)["content"]) if logprobs is not None else None
        shape = responses_api.ResponseShape(frontend.model_name, body.echoed(stored), written, thinking)

        def keep(response: dict) -> None:
            if stored:
                store.put(response, items, owner)

        if body.background:
            queued = shape.response("queued")
            stored_now = store.put(queued, items, owner, background=True)
            store.run(stored_now, _in_background(frontend, shape, job, len(prompt), tools, stored_now))
            if body.stream:  # its events as they come; the client may leave and stream it again from any of them
                return StreamingResponse(
                    store.follow(stored_now), media_type="text/event-stream", headers=_STREAM_HEADERS
                )
            return JSONResponse(queued)
        deltas = frontend.stream(job)
        if body.stream:
            # Admission, routing and prefill run before the headers go out: their errors keep their status.
            merged = _merge([deltas])
            first = await _first_or_cancel(request, merged)
            texts = (delta async for _, delta in _chained(first, merged))
            events = responses_api.events(shape, texts, len(prompt), _error_body, tools, keep)
            return StreamingResponse(events, media_type="text/event-stream", headers=_STREAM_HEADERS)
        (results,) = await _collect_or_cancel(request, [_collect(deltas)])
        generated = responses_api.Generated()
        for delta in results:
            generated.add(delta)
        final = shape.finished(generated, len(prompt), tools)
        keep(final)
        return JSONResponse(final)

    @generating("/v1/messages")
    async def messages(body: AnthropicBody, request: Request):
        frontend.check_model(body.model)
        prompt, tools, thinking = body.prompt(frontend)
        params = body.sampling(tools, thinking)
        job = frontend.build(prompt, params, "messages", "max_tokens")
        message = anthropic_api.Message(frontend.model_name, len(prompt), tools, frontend.thinking(prompt))
        deltas = frontend.stream(job)
        if body.stream:
            # Admission, routing and prefill run before the headers go out: their errors keep their status.
            merged = _merge([deltas])
            first = await _first_or_cancel(request, merged)
            texts = (delta async for _, delta in _chained(first, merged))
            events = anthropic_api.events(message, texts, lambda exc: _printable(str(exc)))
            return StreamingResponse(events, media_type="text/event-stream", headers=_STREAM_HEADERS)
        (results,) = await _collect_or_cancel(request, [_collect(deltas)])
        for delta in results:
            message.add(delta)
        return JSONResponse(message.whole())

    @app.post("/v1/messages/count_tokens", responses=errors(400, *_GUARDED, 404, 503, path="/v1/messages/count_tokens"))
    async def count_tokens(body: AnthropicCountBody) -> dict:
        frontend.check_model(body.model)
        return {"input_tokens": len(body.prompt(frontend)[0])}

    @app.get("/v1/responses/{response_id}", responses=errors(400, *_GUARDED, 404))
    async def stored_response(
        response_id: str, request: Request, stream: str = "false", starting_after: str | None = None
    ):
        """The stored response; with ``stream=true``, a background one's events after ``starting_after`` (its
        sequence number; default: from the first), as they come until its last."""
        _query(request, "stream", "starting_after")
        stored = frontend.responses.get(response_id, _owner(request))
        if stream not in ("true", "false"):
            raise FieldError("stream", "stream must be true or false")
        if stream == "false":
            if starting_after is not None:
                raise FieldError("starting_after", "starting_after is for stream=true")
            return stored.response
        if stored.events is None:
            raise FieldError("stream", "only a background response is streamed again: this one came in its request")
        after = _integer_query("starting_after", starting_after, -1) if starting_after is not None else -1
        events = frontend.responses.follow(stored, after)
        return StreamingResponse(events, media_type="text/event-stream", headers=_STREAM_HEADERS)

    @app.delete("/v1/responses/{response_id}", responses=errors(400, *_GUARDED, 404))
    async def delete_response(response_id: str, request: Request) -> dict:
        _query(request)
        frontend.responses.delete(response_id, _owner(request))
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.post("/v1/responses/{response_id}/cancel", responses=errors(400, *_GUARDED, 404))
    async def cancel_response(response_id: str, request: Request) -> dict:
        _query(request)
        return await frontend.responses.cancel(response_id, _owner(request))

    @app.get("/v1/responses/{response_id}/input_items", responses=errors(400, *_GUARDED, 404))
    async def response_input_items(
        response_id: str, request: Request, limit: str = "20", order: str = "desc", after: str | None = None
    ) -> dict:
        _query(request, "limit", "order", "after")
        return _page(frontend.responses.get(response_id, _owner(request)).items, limit, order, after)

    # Starlette tries routes in order: the ones that nearly every request is for go before the docs' and the rest.
    app.router.routes.sort(key=lambda route: getattr(route, "path", None) not in GENERATING_PATHS)
    return app


def _responses_prompt(
    frontend: Frontend, said: list[dict], tools: Tools | None, template_kwargs: dict | None = None
) -> list[int]:
    """The prompt of a Responses conversation's turns (``template_kwargs``: the chat template's variables, as its
    reasoning asks); a 400 naming ``input`` when its tool turns do not add up."""
    try:
        said = tool_turns(said, frontend.tokenizer)
    except FieldError as exc:  # named as in the turns the items make, which are not the items' places
        raise FieldError("input", f"the turns in input do not add up: {exc}") from None
    return frontend.encode_chat(said, tools.template_tools if tools else None, template_kwargs=template_kwargs)


def _truncated(
    frontend: Frontend,
    body: ResponsesBody,
    items: list[dict],
    tools: Tools | None,
    prompt: list[int],
    template_kwargs: dict | None = None,
) -> list[int]:
    """``truncation: "auto"``: the prompt of the conversation's latest turns that leave room for the output
    (``max_output_tokens``, or a token), dropping whole turns from the start (each kept part starts at a user
    message: the fewest dropped, found by bisection); ``prompt`` (the whole conversation's) where it fits already,
    or where no user message starts a part that fits (then the context's 400 names input as without truncation)."""
    limit = frontend.max_model_len - (body.max_output_tokens or 1)
    if len(prompt) <= limit:
        return prompt
    starts = [i for i, item in enumerate(items) if i and item.get("type") == "message" and item["role"] == "user"]
    render = (
        lambda start: _responses_prompt(  # noqa: E731
            frontend, responses_api.messages(items[start:], body.instructions), tools, template_kwargs
        )
    )
    low, high, best = 0, len(starts), prompt
    while low < high:  # the earliest start whose prompt fits: later ones are shorter
        middle = (low + high) // 2
        candidate = render(starts[middle])
        if len(candidate) <= limit:
            best, high = candidate, middle
        else:
            low = middle + 1
    return best


async def _in_background(
    frontend: Frontend,
    shape: responses_api.ResponseShape,
    job: GenerationRequest,
    prompt_tokens: int,
    tools,
    stored: Stored,
) -> None:
    """A background response's generation: queued until its first token, in progress until its end, which it
    writes to the store (failed with its error, or cancelled), its stream's events kept as they come. Whatever ends
    it, the response ends: a client polling or following it is never left with one in progress for good."""
    store, generated = frontend.responses, responses_api.Generated()
    held = tools is not None and tools.parses
    deltas = frontend.stream(job)
    events = responses_api.events(
        shape, deltas, prompt_tokens, _error_body, tools, store.update, background=True, generated=generated
    )
    try:
        async for event in events:
            if generated.texts and stored.response["status"] == "queued":
                store.update(shape.response("in_progress"))
            store.record(stored, event)
    except asyncio.CancelledError:  # what it gave so far stays: its followers had it already
        store.update(shape.cancelled(generated, prompt_tokens, held))
        raise
    except Exception:  # a fault of this server's (a request's own faults are GenerationErrors): logged, and failed
        log.exception("background response %s failed", shape.id)
        if stored.response["status"] not in ENDED:  # failed before its events could say so
            store.update(shape.failed(generated, responses_api.SERVER_FAULT, held))
    finally:
        store.end_events(stored)


def _owner(request: Request) -> str:
    """Whose request it is, for the store: its API key's hash ("" where the router wants no key)."""
    return getattr(request.state, "api_key_owner", "")


def _query(request: Request, *allowed: str) -> None:
    """A 400 naming a query parameter not among ``allowed``, or one given more than once."""
    query = request.query_params
    for name in query:
        if name not in allowed:
            raise FieldError(name, f"query parameter {name!r} is not supported here")
        if len(query.getlist(name)) > 1:
            raise FieldError(name, f"query parameter {name!r} is given more than once")


MAX_PAGE = 100  # OpenAI's limit on one page of a list


def _integer_query(name: str, value: str, low: int) -> int:
    """A query parameter's integer, at least ``low``; FieldError naming it otherwise."""
    if not re.fullmatch(r"-?[0-9]{1,18}", value) or int(value) < low:
        raise FieldError(name, f"{name} must be an integer of at least {low}")
    return int(value)


def _page(items: list[dict], limit: str, order: str, after: str | None) -> dict:
    """A page of ``items`` as OpenAI lists them: ``limit`` of them, newest first unless ``order`` is asc, from after
    the item whose id is ``after``; a 400 naming the parameter that is out of range or names no item."""
    if not re.fullmatch(r"[0-9]{1,3}", limit) or not 1 <= int(limit) <= MAX_PAGE:
        raise FieldError("limit", f"limit must be an integer from 1 to {MAX_PAGE}")
    if order not in ("asc", "desc"):
        raise FieldError("order", f"order must be asc or desc; got {order!r}")
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]
    if after is not None and after not in ids:
        raise FieldError("after", f"after: no input item has id {after!r}")
    start = 0 if after is None else ids.index(after) + 1
    page = ordered[start : start + int(limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + len(page) < len(ordered),
    }


def _conversation(frontend: Frontend, messages: list[ChatMessageBody]) -> list[dict]:
    """The messages as the chat template reads them: text content (null only beside an assistant's
    tool_calls: router/structured.py refuses it elsewhere) and the tool turns it checked; a 400 naming what is
    malformed."""
    said = []
    for m in messages:
        try:
            content = None if m.content is None else m.text()
        except ValueError as exc:
            raise GenerationError(str(exc), 400, "invalid_request_error", "messages") from exc
        fields = {"tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id, "name": m.name}
        fields["reasoning_content"] = m.reasoning_content
        said.append({"role": m.role, "content": content, **{k: v for k, v in fields.items() if v is not None}})
    return tool_turns(said, frontend.tokenizer)


def _rendered(
    frontend: Frontend,
    body: _Rendering,
    messages: list[ChatMessageBody],
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
) -> list[int]:
    """``messages`` rendered and tokenized as ``body``'s fields say (``add_special_tokens``: default false, as
    chat templates write their own BOS; ``template_kwargs``: the template's variables, if not only the body's
    chat_template_kwargs)."""
    return frontend.encode_chat(
        _conversation(frontend, messages),
        tools,
        body.add_generation_prompt,
        bool(body.add_special_tokens),
        body.continue_final_message,
        body.chat_template_kwargs if template_kwargs is None else template_kwargs,
        body.documents,
    )


def _chat_tools(frontend: Frontend, body: ChatBody) -> Tools | None:
    """The request's tools, if any; a 400 naming ``tools`` when the model's chat template cannot render them."""
    if not body.tools:
        # As OpenAI answers: without tools there is nothing to choose from (tool_choice "none" asks for nothing).
        if body.tool_choice not in (None, "none"):
            raise FieldError("tool_choice", "tool_choice is only allowed when tools are given")
        if body.parallel_tool_calls is not None:
            raise FieldError("parallel_tool_calls", "parallel_tool_calls is only allowed when tools are given")
    return _tools(frontend, body.tools, body.tool_choice, body.parallel_tool_calls)


def _responses_tools(frontend: Frontend, body: ResponsesBody) -> Tools | None:
    """A Responses request's function tools; without tools, its choice may say only what asks nothing ("auto",
    "none": the SDK's defaults)."""
    if not body.tools:
        if body.tool_choice not in (None, "auto", "none"):
            raise FieldError("tool_choice", "tool_choice is only allowed when tools are given")
        return None
    return _tools(frontend, body.tools, body.tool_choice, body.parallel_tool_calls, RESPONSES)


def _tools(frontend: Frontend, tools, tool_choice, parallel, shape: str = CHAT) -> Tools | None:
    """The request's tools (in ``shape``: router/structured.py's), with the model's tool-call syntax; FieldError
    naming ``tools`` when its chat template cannot render them."""
    syntax = tool_call_format(frontend.tokenizer.chat_template_source)
    found = Tools.from_request(tools, tool_choice, parallel, syntax, shape)
    if found is not None and not frontend.tokenizer.supports_tools:
        raise FieldError("tools", "this model's chat template does not render tools, so the model cannot call them")
    return found


def _completion_prompts(frontend: Frontend, prompt, add_special_tokens: bool) -> list[list[int]]:
    """The prompts' token ids; ids the model cannot read are a 400 here, before anything decodes them (echo)."""
    if isinstance(prompt, str):
        return [frontend.encode_text(prompt, add_special_tokens=add_special_tokens)]
    if prompt and all(isinstance(p, int) for p in prompt):
        check_token_ids(prompt, frontend.vocab_size, "prompt")
        return [list(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [frontend.encode_text(p, add_special_tokens=add_special_tokens) for p in prompt]
    if prompt and all(isinstance(p, list) for p in prompt):
        for ids in prompt:
            check_token_ids(ids, frontend.vocab_size, "prompt")
        return [list(p) for p in prompt]
    raise GenerationError(
        "prompt must be a string, a list of strings, or token ids", 400, "invalid_request_error", "prompt"
    )


def _model_card(frontend: Frontend) -> dict:
    served = frontend.model.require()
    return {
        "id": served.name,
        "object": "model",
        "created": served.since,
        "owned_by": "splitserve",
        "max_model_len": frontend.max_model_len,
    }


def _prompt_texts(frontend: Frontend, prompt, prompts: list[list[int]]) -> list[str]:
    """Each prompt's text, as echo returns it before the completion: a text prompt as sent, a token prompt decoded
    (special tokens shown)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [frontend.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]


@dataclass(frozen=True)
class _Completions:
    """How /v1/completions shapes its choices beyond the generated text.

    ``max_tokens`` 0 scores: the workers generate one token (a prefill always samples one), which is dropped.
    ``best_of`` candidates are generated per prompt (with logprobs, to rank them) and the ``n`` with the highest
    cumulative logprob returned; choice ``i * n + j`` is prompt i's j-th."""

    prompts: list[list[int]]
    prompt_texts: list[str] | None  # with echo or logprobs (text offsets count from the prompt's start)
    echo: bool
    texts_sent: bool  # the prompts came as text (their texts show no special token), not as token ids
    max_tokens: int
    logprobs: bool  # the client asked for logprobs
    n: int
    best_of: int
    skip_special_tokens: bool = True  # the generated text leaves special tokens out (text offsets count as it does)

    @classmethod
    def of(
        cls, body: CompletionBody, prompts: list[list[int]], prompt_texts: list[str] | None, cut: bool = False
    ) -> _Completions:
        """``cut``: truncate_prompt_tokens cut a prompt, so that ``prompt_texts`` are the kept tokens' decoded."""
        best_of = body.n if body.best_of is None else body.best_of
        if best_of < body.n:
            raise FieldError("best_of", f"best_of ({best_of}) must be at least n ({body.n})")
        if body.stream and best_of > body.n:
            raise FieldError("best_of", "best_of greater than n cannot stream: the best are known only at the end")
        texts_sent = not cut and (not isinstance(body.prompt, list) or isinstance(body.prompt[0], str))
        logprobs = body.logprobs is not None
        return cls(
            prompts,
            prompt_texts,
            body.echo,
            texts_sent,
            body.max_tokens,
            logprobs,
            body.n,
            best_of,
            body.skip_special_tokens,
        )

    @property
    def scoring(self) -> bool:
        return self.max_tokens == 0

    @property
    def worker_max_tokens(self) -> int:
        return 1 if self.scoring else self.max_tokens

    def worker_logprobs(self, asked: int | None) -> int | None:
        return asked if asked is not None or self.best_of == self.n else 0

    def stream(self, index: int, stream: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        if not self.echo and not self.scoring:
            return stream  # nothing to shape: no layer to pass through
        prompt = index // self.best_of
        echo = (tuple(self.prompts[prompt]), self.prompt_texts[prompt]) if self.echo else None
        return _shaped(stream, echo, self.scoring)

    def text_offsets(self, tokenizer: Tokenizer, index: int) -> _TextOffsets:
        """The text offsets of returned choice ``index`` (choice ``i * n + j`` is prompt i's j-th)."""
        return _TextOffsets(
            tokenizer, self.prompt_texts[index // self.n], not self.texts_sent, self.skip_special_tokens
        )

    def best(self, results: list[list[Delta]]) -> list[list[Delta]]:
        """The n most likely of each prompt's best_of candidates (all of them when best_of == n), logprobs
        dropped where only the ranking wanted them."""
        chosen = []
        for start in range(0, len(results), self.best_of):
            candidates = results[start : start + self.best_of]
            if self.best_of > self.n:
                candidates = sorted(candidates, key=lambda r: -sum(lp.logprob for d in r for lp in d.logprobs))
            chosen.extend(candidates[: self.n])
        if not self.logprobs:
            chosen = [[replace(d, logprobs=()) if d.logprobs else d for d in deltas] for deltas in chosen]
        return chosen


@dataclass(frozen=True)
class _EchoedDelta(Delta):
    """A choice's first delta with the prompt echoed before its text: ``echo_ids`` are the prompt's tokens (their
    logprobs, when asked for, are ``prompt_logprobs``, the first token's being null)."""

    echo_ids: tuple[int, ...] = ()


async def _shaped(
    stream: AsyncIterator[Delta], echo: tuple[tuple[int, ...], str] | None, scoring: bool
) -> AsyncIterator[Delta]:
    first = True
    async for delta in stream:
        if scoring:
            if not first and delta.finish_reason is None:
                continue  # nothing of the dropped token is shown
            usage = delta.usage
            if usage is not None:
                usage = common_pb2.Usage(prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens)
            finish = "length" if delta.finish_reason is not None else None
            delta = replace(
                delta, token_ids=(), text="", logprobs=(), finish_reason=finish, stop_reason=None, usage=usage
            )
        if first and echo is not None:
            fields = {f: getattr(delta, f) for f in Delta.__dataclass_fields__}
            delta = _EchoedDelta(**{**fields, "text": echo[1] + delta.text}, echo_ids=echo[0])
        first = False
        yield delta


def _seeded(params: SamplingParams, choices: int) -> list[SamplingParams]:
    """A prompt's ``choices`` records: with a seed and n > 1, choice j gets seed + j, so the choices differ yet
    reproduce (each prompt of a list starts again from the request's seed, as vLLM seeds each prompt)."""
    if params.seed is None or choices < 2:
        return [params] * choices
    return [replace(params, seed=wrap_seed(params.seed + index)) for index in range(choices)]


# -- responses ----------------------------------------------------------------------------------------


async def _respond(
    request: Request,
    frontend: Frontend,
    body,
    jobs: list[GenerationRequest],
    kind: str,
    prefix: str,
    tools: Tools | None = None,
    completions: _Completions | None = None,
    thinking: reasoning.Thinking | None = None,
):
    """``thinking``: with a reasoning parser, the output's thinking (each choice's text is then split into
    reasoning_content and content: router/reasoning.py); None: the text as written."""
    response_id = f"{prefix}-{secrets.token_hex(16)}"
    names = _TokenNames(frontend, body.return_tokens_as_token_ids, completions)
    created = int(time.time())
    chat = kind == "chat.completion"
    streams = [frontend.stream(job) for job in jobs]
    if completions is not None:
        streams = [completions.stream(index, stream) for index, stream in enumerate(streams)]
    tally = _UsageTally(jobs, completions.best_of if completions is not None else len(jobs), thinking)
    if body.stream:
        options = body.stream_options or StreamOptions()
        deltas = _merge(streams)
        if thinking is not None:
            deltas = _reasoning_deltas(deltas, thinking)
        if tools is not None:
            deltas = _tool_call_deltas(deltas, tools)
        # Admission, routing and prefill run before the headers go out: their errors keep their status (429, 503).
        first = await _first_or_cancel(request, deltas)
        return StreamingResponse(
            _sse(frontend, _chained(first, deltas), len(jobs), response_id, created, chat, options, names, tally),
            media_type="text/event-stream",
            headers=_STREAM_HEADERS,
        )
    results = await _collect_or_cancel(request, [_collect(stream) for stream in streams])
    for index, deltas in enumerate(results):
        for delta in deltas:
            tally.add(index, delta)
    if completions is not None:
        results = completions.best(results)
    response = _full_response(frontend, results, response_id, created, chat, names, tally)
    if body.prompt_logprobs is not None:  # vLLM's place: each choice's, a chat's once (its choices share the prompt)
        written = [_prompt_logprobs(names, deltas) for deltas in results]
        if chat:
            response["prompt_logprobs"] = written[0]
        else:
            for choice, scored in zip(response["choices"], written):
                choice["prompt_logprobs"] = scored
    for choice in response["choices"] if thinking is not None else ():
        thought, content = reasoning.split(thinking, choice["message"]["content"])
        choice["message"].update(reasoning_content=thought or None, content=content)
    for choice in response["choices"] if tools is not None else ():
        content, calls = tools.parse(choice["message"]["content"])
        if calls:
            choice["message"].update(content=content, tool_calls=[call.to_openai() for call in calls])
            choice["finish_reason"] = _tool_finish(choice["finish_reason"])
    # Plain JSON types already: a Response skips FastAPI's jsonable_encoder walk of the whole body.
    return JSONResponse(response)


async def _reasoning_deltas(
    deltas: AsyncIterator[tuple[int, Delta]], thinking: reasoning.Thinking
) -> AsyncIterator[tuple[int, Delta]]:
    """Each choice's text split as it streams into the model's thinking (a delta's ``reasoning``) and its answer
    (the delta's text)."""
    splitters: dict[int, reasoning.Splitter] = {}
    async for index, delta in deltas:
        splitter = splitters.setdefault(index, reasoning.Splitter(thinking.inside))
        thought, text = reasoning.pieces(splitter, delta.text, bool(delta.finish_reason))
        yield index, replace(delta, text=text, reasoning=thought)


@dataclass(frozen=True)
class _ToolCallDelta(Delta):
    tool_calls: tuple = ()


def _tool_finish(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


async def _tool_call_deltas(deltas: AsyncIterator[tuple[int, Delta]], tools: Tools) -> AsyncIterator[tuple[int, Delta]]:
    """A stream whose text is held back to its end, where tool calls are parsed out of it: the last delta of each
    choice carries the content (if any) and the calls. Logprobs still stream as they come. A delta held back whole
    passes its tokens to the next one sent (the usage counts every token)."""
    texts: dict[int, list[str]] = {}
    held: dict[int, tuple[int, ...]] = {}  # per choice: the tokens of deltas not sent, for the next one sent
    async for index, delta in deltas:
        first = index not in texts
        texts.setdefault(index, []).append(delta.text)
        if held.get(index):
            delta = replace(delta, token_ids=held.pop(index) + tuple(delta.token_ids))
        if not delta.finish_reason:
            if first or delta.logprobs or delta.reasoning:  # the thinking streams: tool calls follow it
                yield index, replace(delta, text="")
            else:
                held[index] = tuple(delta.token_ids)
            continue
        content, calls = tools.parse("".join(texts[index]))
        if calls:
            finish = _tool_finish(delta.finish_reason)
            fields = {f: getattr(delta, f) for f in Delta.__dataclass_fields__}
            delta = _ToolCallDelta(
                **{**fields, "text": content or "", "finish_reason": finish},
                tool_calls=tuple(call.to_openai(i) for i, call in enumerate(calls)),
            )
        else:
            delta = replace(delta, text="".join(texts[index]))
        yield index, delta


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no cache or proxy holds events back
DISCONNECT_CHECK_S = 0.5  # how often a request still waiting for its answer asks whether its client left


async def _first_or_cancel(request: Request, deltas: AsyncIterator[tuple[int, Delta]]) -> tuple[int, Delta]:
    """The first delta of a stream; if the client disconnects first, closes the stream (and so the workers' work)."""
    try:
        return await _unless_disconnected(request, anext(deltas))
    except BaseException:
        await deltas.aclose()
        raise


async def _unless_disconnected(request: Request, awaitable):
    """``awaitable``'s result, awaited in this task; if the client disconnects first, the task is cancelled (and
    with it the workers' work), and answers 499 (to nobody)."""
    task = asyncio.current_task()
    watch = _ClientWatch(request, task)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        if watch.fired and task.uncancel() == 0:  # cancelled by the watch alone
            raise _client_gone() from None
        raise
    finally:
        watch.stop()
    if watch.fired:  # the work swallowed the cancellation: the client is gone all the same
        task.uncancel()
        raise _client_gone()
    return result


def _client_gone() -> GenerationError:
    return GenerationError("client disconnected", 499, "client_closed_request")


class _ClientWatch:
    """Asks every DISCONNECT_CHECK_S whether ``request``'s client disconnected, from a timer (a request answered
    sooner costs no task and no wait), and cancels ``task`` if it did (``fired``)."""

    def __init__(self, request: Request, task: asyncio.Task) -> None:
        self._request, self._task = request, task
        self._loop = asyncio.get_running_loop()
        self._check: asyncio.Task | None = None
        self.fired = self._stopped = False
        self._timer = self._loop.call_later(DISCONNECT_CHECK_S, self._start_check)

    def _start_check(self) -> None:
        self._check = self._loop.create_task(self._request.is_disconnected())
        self._check.add_done_callback(self._checked)

    def _checked(self, check: asyncio.Task) -> None:
        if self._stopped or check.cancelled():
            return
        if check.exception() is not None:
            log.warning("could not tell whether a client disconnected: %r", check.exception())
        elif check.result():
            self.fired = True
            self._task.cancel()
            return
        self._timer = self._loop.call_later(DISCONNECT_CHECK_S, self._start_check)

    def stop(self) -> None:
        self._stopped = True
        self._timer.cancel()
        if self._check is not None:
            self._check.cancel()


async def _chained(
    first: tuple[int, Delta], rest: AsyncIterator[tuple[int, Delta]]
) -> AsyncIterator[tuple[int, Delta]]:
    yield first
    async for item in rest:
        yield item


async def _collect(stream: AsyncIterator[Delta]) -> list[Delta]:
    return [delta async for delta in stream]


async def _collect_or_cancel(request: Request, coroutines) -> list[list[Delta]]:
    """Runs the generations; if the client disconnects first, cancels them (and so the workers' work)."""
    if len(coroutines) == 1:  # the common case: awaited in the request's task, no gather
        return [await _unless_disconnected(request, coroutines[0])]
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await _unless_disconnected(request, asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _full_response(
    frontend: Frontend,
    results: list[list[Delta]],
    response_id: str,
    created: int,
    chat: bool,
    names: _TokenNames,
    tally: _UsageTally,
) -> dict:
    choices = []
    for index, deltas in enumerate(results):
        text = "".join(d.text for d in deltas)
        last = deltas[-1]
        logprobs = [lp for d in deltas for lp in d.logprobs]
        choice: dict[str, Any] = {"index": index, "finish_reason": last.finish_reason, "stop_reason": last.stop_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = _chat_logprobs(names, logprobs) if logprobs else None
        else:
            choice["text"] = text
            choice["logprobs"] = _completion_logprobs(names, deltas, names.text_offsets(index))
        choices.append(choice)
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": frontend.model_name,
        "choices": choices,
        "usage": tally.usage(),
    }


class _UsageTally:
    """A request's usage across its choices: each prompt's tokens counted once (choices ``i * per_prompt`` to
    ``(i + 1) * per_prompt - 1`` share prompt i), completion tokens as they come, cached tokens per prompt."""

    def __init__(
        self, jobs: list[GenerationRequest], per_prompt: int, thinking: reasoning.Thinking | None = None
    ) -> None:
        """``thinking``: with a reasoning parser, the output's thinking, whose tokens are counted apart too."""
        self.per_prompt = per_prompt
        self.prompt_tokens = sum(len(job.prompt_token_ids) for job in jobs[::per_prompt])
        self.completion_tokens = 0
        self.cached: dict[int, int] = {}
        self.thinking = thinking
        self.outputs: dict[int, list[int]] = {}  # each choice's tokens, where its thinking is counted

    def add(self, index: int, delta: Delta) -> None:
        self.completion_tokens += len(delta.token_ids)
        if self.thinking is not None:
            self.outputs.setdefault(index, []).extend(delta.token_ids)
        if delta.usage is not None:
            prompt = index // self.per_prompt
            self.cached[prompt] = max(self.cached.get(prompt, 0), delta.usage.cached_tokens)

    def usage(self) -> dict:
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())},
        }
        if self.thinking is not None:  # OpenAI's place for them; completion_tokens counts them too
            reasoning_tokens = sum(self.thinking.tokens(ids) for ids in self.outputs.values())
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return usage


async def _sse(
    frontend: Frontend,
    deltas: AsyncIterator[tuple[int, Delta]],
    choices: int,
    response_id: str,
    created: int,
    chat: bool,
    options: StreamOptions,
    names: _TokenNames,
    tally: _UsageTally,
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    offsets: dict[int, _TextOffsets] = {}  # per choice, across its chunks

    def chunk(choices: list[dict], last: bool = False) -> str:
        payload = {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": frontend.model_name,
            "choices": choices,
        }
        if options.continuous_usage_stats or (options.include_usage and last):
            payload["usage"] = tally.usage()
        elif options.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            for index in range(choices):
                yield chunk(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        async for index, delta in deltas:
            tally.add(index, delta)
            if not chat and index not in offsets:
                offsets[index] = names.text_offsets(index)
            yield chunk([_stream_choice(names, index, delta, chat, offsets.get(index))])
        if options.include_usage:
            yield chunk([], last=True)
    except (GenerationError, TimeoutError) as exc:
        yield f"data: {json.dumps(_error_body(failure(exc)))}\n\n"
    yield "data: [DONE]\n\n"


def _stream_choice(names: _TokenNames, index: int, delta: Delta, chat: bool, offsets: _TextOffsets | None) -> dict:
    choice: dict[str, Any] = {"index": index, "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
    if chat:
        said = delta.text or not (delta.finish_reason or delta.reasoning)
        choice["delta"] = {"content": delta.text} if said else {}
        if delta.reasoning:
            choice["delta"]["reasoning_content"] = delta.reasoning
        if getattr(delta, "tool_calls", ()):
            choice["delta"]["tool_calls"] = list(delta.tool_calls)
        choice["logprobs"] = _chat_logprobs(names, delta.logprobs) if delta.logprobs else None
    else:
        choice["text"] = delta.text
        choice["logprobs"] = _completion_logprobs(names, [delta], offsets)
    return choice


async def _merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleaves several generations' deltas as they come; cancels all if the consumer leaves.

    Each generation runs in a task of its own: the consumer may move between tasks (the request
    handler takes the first delta, the response streams the rest), a generation's timeout may not."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
            await queue.put((index, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


@dataclass(frozen=True)
class _TokenNames:
    """How a response's logprobs name tokens: by text (or ``token_id:N``, vLLM's return_tokens_as_token_ids), by
    raw bytes, and (legacy completions) by where each starts in its choice's text."""

    frontend: Frontend
    as_ids: bool
    completions: _Completions | None

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.frontend.token_text(token_id)

    def raw(self, token_id: int) -> list[int]:
        return list(self.frontend.token_bytes(token_id))

    def text_offsets(self, index: int) -> _TextOffsets | None:
        if self.completions is None or not self.completions.logprobs:
            return None  # no logprobs asked for
        return self.completions.text_offsets(self.frontend.tokenizer, index)


class _TextOffsets:
    """Where each token of one completion choice starts in the choice's text, in characters (the legacy logprobs'
    ``text_offset``, OpenAI's count): an echoed prompt's tokens from 0, the generated ones after the prompt, whose
    length counts whether or not it is echoed. A token ending inside a character starts where the character does,
    and no offset passes the text returned so far (a stop string held back or cut off). Feed it a choice's deltas in
    order, each once.

    ::

        text:     | prompt (echoed or not) | generated text ...
        offset:   0                        len(prompt) + characters the earlier generated tokens decode to
    """

    def __init__(self, tokenizer: Tokenizer, prompt_text: str, special_shown: bool, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._prompt = prompt_text
        self._special_shown = special_shown  # the prompt text shows its special tokens (it was decoded from ids)
        self._generated = IncrementalDetokenizer(tokenizer, skip_special_tokens)  # as the workers decode
        self._decoded = 0  # characters the generated tokens decode to so far
        self._returned = 0  # characters of generated text returned so far

    def of(self, delta: Delta, prompt_ids: list[int]) -> list[int]:
        """Offsets of ``prompt_ids`` (the echoed prompt's, with the first delta) then of the delta's own tokens."""
        offsets = []
        if prompt_ids:
            detokenizer = IncrementalDetokenizer(self._tokenizer, skip_special_tokens=not self._special_shown)
            decoded = 0
            for token_id in prompt_ids:
                offsets.append(min(decoded, len(self._prompt)))
                decoded += len(detokenizer.push(token_id))
        start = len(self._prompt)
        self._returned += len(delta.text) - (start if isinstance(delta, _EchoedDelta) else 0)
        for lp in delta.logprobs:
            offsets.append(start + min(self._decoded, self._returned))
            self._decoded += len(self._generated.push(lp.token_id))
        return offsets


def _completion_logprobs(names: _TokenNames, deltas: list[Delta], offsets: _TextOffsets | None) -> dict | None:
    """The legacy logprobs object of ``deltas``: the tokens of the text returned, an echoed prompt's first (its first
    token has none); None if empty, or where ``offsets`` is None: no logprobs were asked for (those of best_of's
    ranking, and prompt_logprobs, which have a place of their own, are not the client's here)."""
    if offsets is None:
        return None
    token_ids: list[int] = []
    values: list[float | None] = []
    tops: list[dict | None] = []
    text_offset: list[int] = []
    for delta in deltas:
        prompt_ids: list[int] = []
        echoed: tuple[common_pb2.TokenLogprob, ...] = ()
        if isinstance(delta, _EchoedDelta) and delta.prompt_logprobs:
            echoed = delta.prompt_logprobs
            prompt_ids = [delta.echo_ids[0], *(lp.token_id for lp in echoed)]
            token_ids.append(delta.echo_ids[0])  # the prompt's first token: nothing before it to score it
            values.append(None)
            tops.append(None)
        for lp in (*echoed, *delta.logprobs):
            token_ids.append(lp.token_id)
            values.append(lp.logprob)
            # Two candidates may read the same (say, two different parts of characters, each U+FFFD): the key keeps
            # the higher logprob, the ranked order's first. The client cannot tell the two apart by their text, and a
            # key holding a lower-ranked token's logprob would misreport the one it names first.
            top: dict[str, float] = {}
            for t in lp.top:
                top.setdefault(names.text(t.token_id), t.logprob)
            tops.append(top)
        text_offset.extend(offsets.of(delta, prompt_ids))
    if not token_ids:
        return None
    return {
        "tokens": [names.text(t) for t in token_ids],
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": text_offset,
    }


def _prompt_logprobs(names: _TokenNames, deltas: list[Delta]) -> list[dict | None]:
    """vLLM's prompt_logprobs of a choice (its first delta carries them): null for the first prompt token (nothing
    before it predicts it), then for each one after, by token id, the token's own logprob and rank and the most likely
    tokens' (ranks 1, 2, ...)."""
    scored = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), ())

    def entry(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": names.text(token_id)}

    written: list[dict | None] = [None]
    for lp in scored:
        tokens = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, top in enumerate(lp.top, 1):
            tokens.setdefault(str(top.token_id), entry(top.token_id, top.logprob, rank))
        written.append(tokens)
    return written


def _chat_logprobs(names: _TokenNames, logprobs) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        # bytes: the token's own, which may be part of a character: joined, they rebuild the text.
        return {"token": names.text(token_id), "logprob": logprob, "bytes": names.raw(token_id)}

    return {
        "content": [
            dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t.token_id, t.logprob) for t in lp.top])
            for lp in logprobs
        ]
    }


# -- errors and guards ----------------------------------------------------------------------------------


# The parts of a validation error's location that name a union's member type, not a field: "str", "list[int]",
# "function-after[...]", a model's class name. Request fields are lower case, with no brackets.
_TYPE_TAG = re.compile(r"[A-Z]\w*|str|int|float|bool|none|[a-z-]+\[.*\]")


def _located(error: dict) -> tuple[list[str], list[str]]:
    """A validation error's field path (the param), and the union member types it passed through."""
    fields, forms = [], []
    for part in error.get("loc", ()):
        if part == "body":
            continue
        is_form = isinstance(part, str) and _TYPE_TAG.fullmatch(part)
        (forms if is_form else fields).append(str(part))
    return fields, forms


def _error_body(exc: GenerationError) -> dict:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    param = _printable(exc.param) if exc.param is not None else None
    return {"error": {"message": _printable(str(exc)), "type": kind, "param": param, "code": exc.code}}


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate from the request (say, in an unknown field's name) is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    message: str, status: int, code: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(_error_body(GenerationError(message, status, code, param)), status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return JSONResponse(_error_body(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response("We could not parse the JSON body of your request.", 400, "invalid_json")
        location, forms = _located(first)
        param = ".".join(location) or None
        if forms:  # a value that is none of a union's types: each type's error names its form
            located = [_located(error) for error in exc.errors()]
            forms = [form for where, its_forms in located if where == location for form in its_forms]
            first = {**first, "msg": f"{first.get('msg')} (the forms it may take: {', '.join(dict.fromkeys(forms))})"}
        if first.get("type") == "extra_forbidden":
            return error_response(
                f"Unrecognized request argument supplied: {param}", 400, "invalid_request_error", param
            )
        if first.get("type") in ("unsupported_field", "invalid_utf8"):
            return error_response(first["msg"], 400, "invalid_request_error", param)
        return error_response(f"{param + ': ' if param else ''}{first.get('msg')}", 400, "invalid_request_error", param)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, exc: FieldError):
        return error_response(str(exc), 400, "invalid_request_error", exc.field)

    @app.exception_handler(ValidationError)
    async def pydantic_error(request: Request, exc: ValidationError):
        return error_response(str(exc), 400, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code, "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(TimeoutError)
    async def timeout_error(request: Request, exc: TimeoutError):
        ended = failure(exc)
        return error_response(str(ended), ended.status, ended.code)


def _document_errors_honestly(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; invalid requests are answered 400 here, so the
    document says that (each route's ``responses=``) and not 422."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi


# Without an API key even when keys are set: liveness and readiness (probes). /metrics and the API docs join them only
# when the config opens them; /admin and the dashboard's data want the admin token instead (router/admin.py).
_OPEN_PATHS = frozenset({"/health", "/ready"})
_METRICS_PATHS = frozenset({"/metrics"})
_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_PREFIXES = ("/admin/", "/dashboard")


def open_paths(config) -> frozenset[str]:
    """The paths a router with API keys answers without one."""
    return (
        _OPEN_PATHS
        | (_METRICS_PATHS if config.open_metrics else frozenset())
        | (_DOCS_PATHS if config.open_docs else frozenset())
    )


def _install_guards(app: FastAPI, frontend: Frontend, api_keys: tuple[str, ...]) -> None:
    app.add_middleware(_Guard, frontend=frontend, api_keys=api_keys, routes=app.router.routes)
    origins = cors_origin_list(frontend.config.cors_origins)
    if origins:
        # Outside the guard: a browser's preflight (OPTIONS) carries no API key, and is answered here. The API key
        # travels in a header, never a cookie: no credentials. Scripts may read the request id and Retry-After.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )


class _Guard:
    """API keys, body size and request counts, as plain ASGI middleware: Starlette's BaseHTTPMiddleware
    (``@app.middleware``) would hide the client's disconnect from ``request.is_disconnected()``, and with it
    the cancellation of a non-streaming request whose client left."""

    def __init__(self, app, frontend: Frontend, api_keys: tuple[str, ...], routes: list) -> None:
        self.app = app
        self.routes = routes  # the app's, to name the route of a request refused before routing
        self.frontend = frontend
        self.api_keys = api_keys
        self.limit = frontend.config.max_body_bytes
        self.open_paths = open_paths(frontend.config)
        self.access_log = frontend.config.access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = Headers(scope=scope)
        # Every answer names its request (X-Request-Id, which OpenAI's SDKs read as `_request_id`): the client's
        # own, as a proxy in front may set it, or one made here; the request's trace span carries it too.
        request_id = headers.get(REQUEST_ID_HEADER)
        try:
            check_request_id(request_id or "", REQUEST_ID_HEADER)
        except FieldError as exc:
            request_id = None
            refusal = error_response(str(exc), 400, "invalid_request_error", REQUEST_ID_HEADER)
        else:
            refusal = None
        request_id = request_id or f"req_{secrets.token_hex(16)}"
        serving(request_id)
        answer = _Answer(send, request_id, anthropic_api.is_anthropic(scope["path"]))
        scope.setdefault("state", {})["answer"] = answer  # a body's request_id renames it (_name_request)
        receive = answer.watching(receive)
        try:
            if refusal is not None:
                await refusal(scope, receive, answer)
            else:
                await self._guarded(scope, receive, answer, headers)
        finally:
            if answer.outcome:  # every answer, refusals of the guard's own included (a 401 is what to watch for)
                self.frontend.metrics.requests_by(self._route_template(scope), str(answer.outcome)).inc()
            if self.access_log:
                host, port = (scope.get("client") or ("-", 0))[:2]
                request = f"{scope['method']} {scope['path']}"  # status "-": the client left before an answer
                log_access(f"{host}:{port}", request, answer.outcome or "-", started, answer.request_id)

    async def _guarded(self, scope, receive, send: _Answer, headers: Headers) -> None:
        path = scope["path"]
        # The operator API and the dashboard answer to the admin token instead (router/admin.py).
        if self.api_keys and path not in self.open_paths and not path.startswith(ADMIN_PREFIXES):
            # OpenAI's SDKs send the key as a bearer token, Anthropic's as x-api-key.
            supplied = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("x-api-key", "")
            if not any(hmac.compare_digest(supplied, key) for key in self.api_keys):
                await error_response("Incorrect API key provided.", 401, "invalid_api_key")(scope, receive, send)
                return
            # Whose request it is: a stored response is its key's alone (router/stored_responses.py).
            scope.setdefault("state", {})["api_key_owner"] = hashlib.sha256(supplied.encode()).hexdigest()
        encoding = headers.get("content-encoding", "identity")
        if encoding.strip().lower() != "identity":  # a compressed body is not read as one: refused, not misread
            message = f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
            await error_response(message, 415, "invalid_request_error", "Content-Encoding")(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large()(scope, receive, send)
            return
        if scope["method"] == "POST" and declared is None:
            body = await self._read_body(receive)
            if body is _CLIENT_GONE:
                return  # a partial body is no request: nothing runs, and there is no one to answer
            if body is None:
                await self._too_large()(scope, receive, send)
                return
            receive = _replaying(body, receive)
        await self.app(scope, receive, send)

    def _route_template(self, scope) -> str:
        """The matched route's path template (Starlette sets ``scope["route"]``; a request refused before routing is
        matched here), or "other": a bounded label set, where raw paths would make a series per junk path."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] is not Match.NONE), None)
        return getattr(route, "path", None) or "other"

    def _too_large(self) -> JSONResponse:
        return error_response(f"request body larger than {self.limit} bytes", 413, "request_too_large")

    async def _read_body(self, receive) -> bytes | object | None:
        """A body sent without content-length, None once it passes the limit, _CLIENT_GONE if it never ended."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _CLIENT_GONE
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            if not message.get("more_body"):
                return b"".join(chunks)


_CLIENT_GONE = object()
REQUEST_ID_HEADER = "x-request-id"


def _name_request(request: Request, request_id: str | None) -> None:
    """vLLM's ``request_id`` field: the client's name for its request, honoured as X-Request-Id is (the answer's
    header, the router's log lines, the trace); a 400 naming it where the header names the request otherwise."""
    if not request_id:
        return
    check_request_id(request_id, "request_id")
    sent = request.headers.get(REQUEST_ID_HEADER)
    if sent and sent != request_id:
        raise FieldError("request_id", f"request_id {request_id!r} differs from the X-Request-Id header {sent!r}")
    request.scope["state"]["answer"].request_id = request_id
    serving(request_id)


class _Answer:
    """The ASGI ``send`` of one request: adds its X-Request-Id header to the response's start, and keeps its status.
    ``anthropic``: an error answer's body is rewritten into Anthropic's error shape (router/anthropic_api.py), one
    place for every error a route of that API answers with (the guard's, validation's, the handlers')."""

    def __init__(self, send, request_id: str, anthropic: bool = False) -> None:
        self._send = send
        self.request_id = request_id
        self._anthropic = anthropic
        self._held: dict | None = None  # an error's response start, sent with its rewritten body
        self.status = 0
        self.complete = False  # the response's last body message went
        self.client_left = False  # the client disconnected (the app's receive said so)

    @property
    def outcome(self) -> int:
        """The status to count and log: 499 where the client left before the answer was whole (nginx's), whatever
        status the answer began with (a stream starts 200 to a client gone a moment before); 0: no answer."""
        return 499 if self.client_left and not self.complete else self.status

    def watching(self, receive):
        """``receive``, noting a disconnect."""

        async def watched():
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
            return message

        return watched

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", self.request_id.encode("latin-1"))]
            if self._anthropic and self.status >= 400:
                self._held = message
                return
        elif self._held is not None and message["type"] == "http.response.body":
            start, self._held = self._held, None
            error = json.loads(message.get("body", b"") or b"{}").get("error", {})
            said, param = error.get("message", ""), error.get("param")
            said = f"{param}: {said}" if param and param not in said else said  # Anthropic's errors have no param
            body = json.dumps(anthropic_api.error_body(said, self.status)).encode()
            kept = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await self._send({**start, "headers": [*kept, (b"content-length", str(len(body)).encode())]})
            message = {"type": "http.response.body", "body": body, "more_body": False}
        await self._send(message)


def _replaying(body: bytes, receive):
    """``receive`` that hands out an already-read body first, then the client's later messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay
