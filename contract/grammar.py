"""Structured output: the grammar a request's tokens must follow, as a compact spec both sides share.

A spec is a kind and a text (a JSON schema, a regex, a JSON list of choices, or a Lark/GBNF grammar). The router
builds and checks it; it travels inside the sampling record; each worker compiles it once per spec key with its
tokenizer and masks the logits with it (engine/grammar.py). The grammar engine is llguidance, whose compiler is
torch-free, so the router can check a grammar without the model. Errors are ``FieldError``s naming the field.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

from contract.errors import FieldError
from protos import common_pb2

KINDS = ("json_schema", "regex", "choice", "grammar")
MAX_GRAMMAR_CHARS = 256 * 1024
# Compact JSON: a model is never free to emit unbounded whitespace between tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """``kind`` in KINDS; ``text`` its source. ``accepted_prompt_tokens``: the last n prompt tokens are output the
    grammar already accepted (a request migrated with its tokens so far); it is state, not part of the ``key``."""

    kind: str
    text: str
    accepted_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FieldError("grammar", f"grammar kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not isinstance(self.text, str) or not self.text or len(self.text) > MAX_GRAMMAR_CHARS:
            raise FieldError("grammar", f"a grammar is a non-empty string of at most {MAX_GRAMMAR_CHARS} characters")
        if isinstance(self.accepted_prompt_tokens, bool) or not 0 <= self.accepted_prompt_tokens < 1 << 32:
            raise FieldError("grammar", "accepted_prompt_tokens must be an integer in [0, 2^32)")

    @property
    def key(self) -> str:
        """Names the compiled grammar: equal keys compile to the same matcher."""
        return hashlib.sha256(f"{self.kind}\0{self.text}".encode()).hexdigest()

    def compiled(self) -> str:
        """The llguidance grammar for this spec; FieldError('grammar') if it is invalid."""
        return _compile(self.kind, self.text)

    def to_wire(self) -> common_pb2.Grammar:
        return common_pb2.Grammar(kind=self.kind, text=self.text, accepted_prompt_tokens=self.accepted_prompt_tokens)

    @classmethod
    def from_wire(cls, message: common_pb2.Grammar) -> Grammar:
        return cls(message.kind, message.text, message.accepted_prompt_tokens)

    def check(self, field: str) -> None:
        """FieldError naming ``field`` (the request field the spec came from) if the grammar is invalid."""
        try:
            self.compiled()
        except FieldError as exc:
            raise FieldError(field, f"{field}: {exc}") from exc


def json_schema(schema, field: str) -> Grammar:
    """A spec for a JSON schema given as a dict or as its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"{field} is not valid JSON: {exc}") from exc
        except RecursionError:
            raise FieldError(field, f"{field} nests deeper than its JSON can be read") from None
    if not isinstance(schema, (dict, bool)):
        raise FieldError(field, f"{field} must be a JSON schema (an object)")
    grammar = Grammar("json_schema", json.dumps(schema, separators=(",", ":")))  # key order is output order
    grammar.check(field)
    return grammar


def choice(choices, field: str) -> Grammar:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise FieldError(field, f"{field} must be a non-empty list of non-empty strings")
    grammar = Grammar("choice", json.dumps(choices))
    grammar.check(field)
    return grammar


def text_grammar(kind: str, text, field: str) -> Grammar:
    """A regex or a Lark/GBNF grammar."""
    if not isinstance(text, str) or not text:
        raise FieldError(field, f"{field} must be a non-empty string")
    grammar = Grammar(kind, ascii_classes(text) if kind == "regex" else text)
    grammar.check(field)
    return grammar


_ASCII_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_"}


def ascii_classes(pattern: str) -> str:
    """``pattern`` with ``\\d`` and ``\\w`` (and ``\\D``, ``\\W`` outside a class) spelled as the ASCII classes JSON
    Schema's ``pattern`` and vLLM's regexes mean. llguidance reads them as Unicode's: a phone number's digits came out
    as U+1FBF8, a digit to it."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            body = _ASCII_CLASSES.get(escaped.lower())
            if body is None or (in_class and escaped.isupper()):
                out.append(pattern[i : i + 2])  # another escape, or a negated class inside a class: as written
            elif in_class:
                out.append(body)
            else:
                out.append(f"[{'^' if escaped.isupper() else ''}{body}]")
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
            opening = 1 + (pattern[i + 1 : i + 2] == "^")
            opening += pattern[i + opening : i + opening + 1] == "]"  # a ']' first in a class is itself
            out.append(pattern[i : i + opening])
            i += opening
            continue
        if char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> str:
    llguidance = _llguidance()
    matcher = llguidance.LLMatcher
    try:
        if kind == "json_schema":
            compiled = matcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)
        elif kind == "regex":
            compiled = matcher.grammar_from_regex(text)
        elif kind == "choice":
            compiled = llguidance.grammar_from("choice", json.loads(text))
        else:
            compiled = llguidance.grammar_from("grammar", text)
    except ValueError as exc:
        raise FieldError("grammar", f"invalid {kind}: {exc}") from exc
    error = matcher.validate_grammar(compiled)
    if error:
        raise FieldError("grammar", f"invalid {kind}: {error.strip()}")
    return compiled


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # a dependency; refused, not crashed on, where an install lacks it
        raise FieldError("grammar", "structured output needs the llguidance package, which is not installed") from exc
    return llguidance
