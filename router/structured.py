"""Structured output and tool calls at the front door.

Request fields become one grammar spec (contract/grammar.py): OpenAI's ``response_format``, vLLM's ``guided_*``
fields and its ``structured_outputs`` object. Tools are rendered by the model's chat template; its tool-call
syntax (Hermes/Qwen ``<tool_call>{json}</tool_call>``, or Llama-3.1's bare ``{"name", "parameters"}`` JSON) is
parsed out of the text, and ``tool_choice`` ``required`` or a named function is enforced by a grammar over the
allowed tools' parameters wrapped in that syntax. A conversation's earlier tool turns (an assistant's
``tool_calls``, ``role: tool`` results) are checked and shaped as Hugging Face templates read them. Errors are
``FieldError``s naming the field.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from contract import grammar as specs
from contract.errors import FieldError
from contract.grammar import Grammar

# vLLM's structured_outputs object: its keys that name a constraint, and the spec each makes.
_STRUCTURED_OUTPUT_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def grammar_from_fields(body: Any) -> Grammar | None:
    """The one grammar a request body asks for (None for free text); FieldError names a bad or second one."""
    found: list[tuple[str, Grammar]] = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None:
        grammar = _format_grammar(response_format, "response_format", flat=False)
        if grammar is not None:
            found.append(("response_format", grammar))
    if getattr(body, "guided_json", None) is not None:
        found.append(("guided_json", specs.json_schema(body.guided_json, "guided_json")))
    if getattr(body, "guided_regex", None) is not None:
        found.append(("guided_regex", specs.text_grammar("regex", body.guided_regex, "guided_regex")))
    if getattr(body, "guided_choice", None) is not None:
        found.append(("guided_choice", specs.choice(body.guided_choice, "guided_choice")))
    if getattr(body, "guided_grammar", None) is not None:
        found.append(("guided_grammar", specs.text_grammar("grammar", body.guided_grammar, "guided_grammar")))
    if getattr(body, "structured_outputs", None) is not None:
        grammar = _structured_outputs(body.structured_outputs)
        if grammar is not None:
            found.append(("structured_outputs", grammar))
    if len(found) > 1:
        raise FieldError(found[1][0], f"{found[1][0]} and {found[0][0]} both constrain the output; give one")
    return found[0][1] if found else None


_SCHEMA_FORMAT_KEYS = {"name", "description", "schema", "strict"}
# A json_schema format as chat (False) and the Responses API (True, flat) write it.
_SCHEMA_FORMAT = {
    False: '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
    True: '{"type": "json_schema", "name": ..., "schema": {...}}',
}


def _format_grammar(value: Any, field: str, flat: bool) -> Grammar | None:
    """The grammar an OpenAI output format asks for: None for text, a JSON object's, or a json_schema format's
    schema, which chat nests in ``json_schema`` and the Responses API keeps beside ``type`` (``flat``); FieldError
    naming ``field`` for any other shape."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object") and set(value) == {"type"}:
        return None if kind == "text" else specs.json_schema({"type": "object"}, field)
    described = None
    if kind == "json_schema" and flat:
        described = {k: v for k, v in value.items() if k != "type"}
    elif kind == "json_schema" and set(value) == {"type", "json_schema"} and isinstance(value["json_schema"], dict):
        described = value["json_schema"]
        if set(described) - _SCHEMA_FORMAT_KEYS or "schema" not in described:
            raise FieldError(field, f"{field}.json_schema needs a schema (and may have name, description, strict)")
    if described is None or set(described) - _SCHEMA_FORMAT_KEYS or "schema" not in described:
        raise FieldError(
            field, f'{field} must be {{"type": "text"}}, {{"type": "json_object"}} or {_SCHEMA_FORMAT[flat]}'
        )
    where = field if flat else f"{field}.json_schema"
    for key, kind in (("name", str), ("description", str), ("strict", bool)):
        if described.get(key) is not None and not isinstance(described[key], kind):
            raise FieldError(f"{where}.{key}", f"{where}.{key} must be a {'string' if kind is str else 'boolean'}")
    return specs.json_schema(described["schema"], field)


def text_format(text: Any) -> Grammar | None:
    """The grammar a Responses request's ``text`` asks for (its ``format``: text, json_object, or json_schema with
    the schema beside its name); FieldError naming ``text.format``."""
    if text is None:
        return None
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise FieldError(f"text.{unknown[0]}", f"text.{unknown[0]} is not supported")
    if text.get("verbosity") not in (None, "medium"):
        raise FieldError("text.verbosity", "text.verbosity is not supported (the served model has one verbosity)")
    return None if text.get("format") is None else _format_grammar(text["format"], "text.format", flat=True)


def _structured_outputs(value: Any) -> Grammar | None:
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise FieldError(field, "structured_outputs must be an object")
    unknown = sorted(set(value) - set(_STRUCTURED_OUTPUT_KEYS))
    if unknown:
        raise FieldError(f"{field}.{unknown[0]}", f"{field}.{unknown[0]} is not supported")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    if len(given) > 1:
        raise FieldError(field, f"structured_outputs constrains the output once; got {', '.join(sorted(given))}")
    if not given:
        return None
    key, spec = next(iter(given.items()))
    where = f"{field}.{key}"
    if key == "json":
        return specs.json_schema(spec, where)
    if key == "json_object":
        if spec is not True:
            raise FieldError(where, f"{where} must be a boolean")
        return specs.json_schema({"type": "object"}, where)
    if key == "choice":
        return specs.choice(spec, where)
    return specs.text_grammar(key, spec, where)


# -- tools ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


# The shapes a request's tools come in: chat completions', the Responses API's, Anthropic's Messages API's.
CHAT, RESPONSES, ANTHROPIC = "chat", "responses", "anthropic"

HERMES = "hermes"  # <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>   (Qwen2, Qwen3, Hermes)
LLAMA_JSON = "llama_json"  # {"name": ..., "parameters": {...}}                     (Llama 3.1+)


def tool_call_format(template_source: str) -> str:
    """The tool-call syntax a chat template teaches its model."""
    return HERMES if "<tool_call>" in template_source else LLAMA_JSON


@dataclass(frozen=True)
class Tools:
    """A request's tools: definitions (OpenAI's), the choice, and the model's tool-call syntax."""

    definitions: tuple[dict, ...]
    choice: str  # "auto", "required", "none", or the name of the one function to call
    parallel: bool
    syntax: str

    @classmethod
    def from_request(cls, tools: Any, tool_choice: Any, parallel: Any, syntax: str, shape: str = CHAT) -> Tools | None:
        """None when there is nothing to do (no tools); FieldError names a malformed field, by its name in the
        request's ``shape``: chat's (a function's fields nested in ``function``), the Responses API's (beside its
        ``type``, its choice too) or Anthropic's (``input_schema``, a choice of ``auto``, ``any``, ``tool`` or
        ``none``). The definitions are kept in chat's shape, which chat templates read."""
        definitions = tuple(_tool_definition(t, i, shape) for i, t in enumerate(tools or ()))
        names = [d["function"]["name"] for d in definitions]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tools must have distinct function names")
        choice = _tool_choice(tool_choice, names, shape)
        if parallel is not None and not isinstance(parallel, bool):
            raise FieldError("parallel_tool_calls", "parallel_tool_calls must be a boolean")
        if not definitions:
            return None
        return cls(definitions, choice, parallel is not False, syntax)

    @property
    def template_tools(self) -> list[dict]:
        return [dict(d) for d in self.definitions]

    @property
    def parses(self) -> bool:
        """Whether the output is read for tool calls (not with tool_choice "none")."""
        return self.choice != "none"

    def grammar(self) -> Grammar | None:
        """The grammar enforcing ``required`` or a named function; None for ``auto`` and ``none``."""
        if self.choice in ("auto", "none"):
            return None
        chosen = [d for d in self.definitions if self.choice == "required" or d["function"]["name"] == self.choice]
        arguments = "arguments" if self.syntax == HERMES else "parameters"
        calls = [_call_schema(d["function"], arguments) for d in chosen]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.syntax == LLAMA_JSON:
            return specs.json_schema(schema, "tool_choice")
        repeat = ' ("\\n" call)*' if self.choice == "required" and self.parallel else ""
        compact = {"x-guidance": {"whitespace_flexible": False}, **schema}  # as contract/grammar.py's JSON
        call = 'call: "<tool_call>\\n" body "\\n</tool_call>"'
        lark = f"start: call{repeat}\n{call}\nbody: %json {json.dumps(compact)}\n"
        return specs.text_grammar("grammar", lark, "tool_choice")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output; calls that do not parse stay in the content."""
        found = _hermes_calls(text) if self.syntax == HERMES else _llama_calls(text)
        calls = [call for call, _ in found]
        if not calls:
            return text, []
        if not self.parallel:
            calls = calls[:1]
        content = text
        for _, span in found:
            content = content.replace(span, "")  # Llama's span is the whole text: no content
        return content.strip() or None, calls


def _tool_definition(tool: Any, index: int, shape: str) -> dict:
    where = f"tools.{index}"
    schema_field = "parameters"
    if shape == ANTHROPIC:
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise FieldError(f"{where}.type", f"{where} is a {kind!r} tool; only custom (client) tools are supported")
        unknown = set(tool) - {"type", "name", "description", "input_schema", "cache_control"}
        if unknown:
            raise FieldError(where, f"{where} has unknown keys: {sorted(unknown)}")
        if not isinstance(tool.get("input_schema"), dict):
            raise FieldError(f"{where}.input_schema", f"{where}.input_schema must be a JSON schema (an object)")
        function = {k: v for k, v in tool.items() if k in ("name", "description")}
        function["parameters"] = tool["input_schema"]
        at, schema_field = where, "input_schema"
    elif shape == RESPONSES:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise FieldError(f"{where}.type", f"{where} is a {kind!r} tool; only function tools are supported")
        function, at = {k: v for k, v in tool.items() if k != "type"}, where
    else:
        function, at = tool.get("function") if isinstance(tool, dict) else None, f"{where}.function"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise FieldError(where, f'{where} must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        if set(tool) != {"type", "function"}:
            raise FieldError(where, f"{where} has unknown keys: {sorted(set(tool) - {'type', 'function'})}")
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise FieldError(f"{at}.name", "a function name is 1-64 letters, digits, _ . or -")
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise FieldError(at, f"{at} has unknown keys: {sorted(unknown)}")
    parameters = function.get("parameters", {"type": "object"})
    specs.json_schema(parameters, f"{at}.{schema_field}")  # a schema the grammar engine compiles
    return {"type": "function", "function": {**function, "parameters": parameters}}


def _tool_choice(value: Any, names: list[str], shape: str) -> str:
    if value is None:
        return "auto" if names else "none"
    if shape == ANTHROPIC:
        return _anthropic_tool_choice(value, names)
    flat = shape == RESPONSES
    if value in ("auto", "required", "none"):
        if value == "required" and not names:
            raise FieldError("tool_choice", 'tool_choice "required" needs tools')
        return value
    named = value if flat else value.get("function", {}) if isinstance(value, dict) else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        shape = '{"type": "function", "name": ...}' if flat else '{"type": "function", "function": {"name"}}'
        raise FieldError("tool_choice", f'tool_choice must be "auto", "required", "none" or {shape}')
    if name not in names:
        raise FieldError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
    return name


# An Anthropic tool_choice's type, as chat's choice: "tool" names the one to call.
_ANTHROPIC_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _anthropic_tool_choice(value: Any, names: list[str]) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in (*_ANTHROPIC_CHOICES, "tool") or set(value) - {"type", "name", "disable_parallel_tool_use"}:
        raise FieldError("tool_choice", 'tool_choice must be {"type": "auto" | "any" | "tool" | "none"}')
    if kind == "any" and not names:
        raise FieldError("tool_choice", 'tool_choice "any" needs tools')
    if kind != "tool":
        return _ANTHROPIC_CHOICES[kind]
    if value.get("name") not in names:
        raise FieldError("tool_choice.name", f"tool_choice names {value.get('name')!r}, which is not among the tools")
    return value["name"]


def _call_schema(function: dict, arguments: str) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments: function["parameters"]},
        "required": ["name", arguments],
        "additionalProperties": False,
    }


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _hermes_calls(text: str) -> list[tuple[ToolCall, str]]:
    found = []
    for match in _HERMES_CALL.finditer(text):
        call = _call_from_json(match.group(1), "arguments")
        if call is not None:
            found.append((call, match.group(0)))
    return found


def _llama_calls(text: str) -> list[tuple[ToolCall, str]]:
    """Llama's calls are the whole output or nothing: one JSON object, or several joined by ';'."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    whole = _call_from_json(body, "parameters")
    if whole is not None:
        return [(whole, text)]
    calls = [_call_from_json(part.strip(), "parameters") for part in body.split(";")]
    if not body or None in calls:
        return []
    return [(call, text) for call in calls]


def _call_from_json(text: str, arguments_key: str) -> ToolCall | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # nested past what Python parses
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):
        arguments_text = arguments
    else:
        arguments_text = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], arguments_text, f"call_{uuid.uuid4().hex[:24]}")


# -- earlier tool turns in a conversation ------------------------------------------------------------------

# The roles a chat message may have, on every API (HTTP's request model, the gRPC API); others are refused.
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def tool_turns(messages: list[dict], template) -> list[dict]:
    """The conversation as the chat template of ``template`` (the served model's tokenizer) reads it, its tool turns
    checked, and a developer message in the role the template gives it (``developer_role``), on every API.

    ``messages`` are ``{"role", "content"}`` with ``tool_calls`` / ``tool_call_id`` where the client sent them.
    An assistant's ``tool_calls`` reach the template as ``{"id", "type", "function": {"name", "arguments"}}``
    with ``arguments`` parsed from OpenAI's JSON string into the object templates expect (they write it with
    ``tojson``); a tool message keeps ``tool_call_id``, which must name a call an earlier assistant message made.
    FieldError names the offending ``messages.i...`` field, also when the template cannot render tool turns
    (``template.supports_tool_calls`` false): dropping them would show the model a different conversation.
    """
    issued: set[str] = set()
    turns = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if message["role"] not in CHAT_ROLES:
            raise FieldError(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}")
        role = template.developer_role if message["role"] == "developer" else message["role"]
        turn = {"role": role, "content": message["content"]}
        if message.get("name") is not None:
            turn["name"] = message["name"]
        if message.get("reasoning_content") is not None:  # the turn's thinking: the template's to render
            if message["role"] != "assistant":
                raise FieldError(f"{where}.reasoning_content", "only assistant messages carry reasoning_content")
            turn["reasoning_content"] = message["reasoning_content"]
        if message.get("tool_calls"):
            if message["role"] != "assistant":
                raise FieldError(f"{where}.tool_calls", "only assistant messages carry tool_calls")
            if not template.supports_tool_calls:
                raise FieldError(
                    f"{where}.tool_calls",
                    "this model's chat template does not render tool calls, so it cannot see them",
                )
            turn["tool_calls"] = [
                _earlier_call(call, f"{where}.tool_calls.{j}", issued) for j, call in enumerate(message["tool_calls"])
            ]
        if message["role"] == "tool":
            turn["tool_call_id"] = _answered_call(message.get("tool_call_id"), f"{where}.tool_call_id", issued)
        elif message.get("tool_call_id") is not None:
            raise FieldError(f"{where}.tool_call_id", "only tool messages carry a tool_call_id")
        if message["content"] is None and not turn.get("tool_calls"):  # null only beside an assistant's calls
            role = message["role"]
            raise FieldError(
                f"{where}.content",
                "a tool message carries the tool's result as its content"
                if role == "tool"
                else f"a {role} message needs content (null only beside tool_calls)",
            )
        turns.append(turn)
    return turns


def _earlier_call(call: Any, where: str, issued: set[str]) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or call.get("type") != "function" or not isinstance(function, dict):
        raise FieldError(
            where, f'{where} must be {{"id": ..., "type": "function", "function": {{"name", "arguments"}}}}'
        )
    if set(call) != {"id", "type", "function"}:
        raise FieldError(
            where, f"{where} has unknown or missing keys: {sorted(set(call) ^ {'id', 'type', 'function'})}"
        )
    if not isinstance(call["id"], str) or not call["id"] or call["id"] in issued:
        raise FieldError(
            f"{where}.id", f"{where}.id must be a non-empty string no other tool call in the conversation has"
        )
    if set(function) != {"name", "arguments"} or not isinstance(function["name"], str) or not function["name"]:
        raise FieldError(f"{where}.function", f'{where}.function must be {{"name": string, "arguments": string}}')
    arguments = function["arguments"]
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except (json.JSONDecodeError, RecursionError):  # nested past what Python parses
        parsed = None
    if not isinstance(parsed, dict):
        raise FieldError(
            f"{where}.function.arguments", f"{where}.function.arguments must be a JSON object, as a string"
        )
    issued.add(call["id"])
    return {"id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": parsed}}


def _answered_call(call_id: Any, where: str, issued: set[str]) -> str:
    if not isinstance(call_id, str):
        raise FieldError(where, "a tool message names the tool call it answers in tool_call_id")
    if call_id not in issued:
        raise FieldError(where, f"{where} {call_id!r} answers no tool call an earlier assistant message made")
    return call_id
