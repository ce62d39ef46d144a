"""A subset of Go's text/template, with the Sprig/Helm functions the splitserve chart uses.

Why it exists: CI renders deploy/helm/splitserve offline, and no helm binary can be installed from
the package registries CI reaches. It keeps Go's semantics where a chart depends on them —
whitespace trimming, variable scoping, truthiness, numbers from values being float64 (Helm reads
values through JSON, so 1000000 prints as 1e+06), missing keys printing as "" — and refuses what it
does not implement, so that a template it renders renders the same under `helm template`.

Supported: text and comments with trim markers; pipelines, parenthesised pipelines, field chains on
`.`, `$` and variables; `:=` and `=`; if / else if / else, range (lists, maps in key order, with
`$i, $v :=`), with / else, define, template, and the functions in ``FUNCTIONS`` plus ``include``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal

import yaml


class TemplateError(Exception):
    pass


# -- lexing -------------------------------------------------------------------------------------

KEYWORDS = {
    "if",
    "else",
    "end",
    "range",
    "with",
    "define",
    "template",
    "block",
    "break",
    "continue",
    "true",
    "false",
    "nil",
}
_SPACE = " \t\r\n"
_NUMBER = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Token:
    kind: str  # string number bool nil field dot var ident keyword ( ) | , := =
    value: object
    spaced: bool  # whitespace right before it: `.A .B` are two operands, `.A.B` one chain


@dataclass
class Item:
    kind: str  # "text" or "action"
    value: object  # str, or list[Token]
    line: int


def _go_string(raw: str, where: str) -> str:
    out, i = [], 0
    simple = {
        "n": "\n",
        "t": "\t",
        "r": "\r",
        "\\": "\\",
        '"': '"',
        "'": "'",
        "a": "\a",
        "b": "\b",
        "f": "\f",
        "v": "\v",
    }
    while i < len(raw):
        c = raw[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt in "xuU":
            size = {"x": 2, "u": 4, "U": 8}[nxt]
            out.append(chr(int(raw[i + 2 : i + 2 + size], 16)))
            i += 2 + size
        else:
            raise TemplateError(f"{where}: unknown escape \\{nxt} in string")
    return "".join(out)


def lex(source: str, name: str) -> list[Item]:
    """Splits a template into text and actions, applying the `{{-` / `-}}` trim markers."""
    items: list[Item] = []
    pos, trim_next = 0, False
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        trim_left = start >= 0 and source.startswith("{{-", start) and source[start + 3 : start + 4] in tuple(_SPACE)
        if trim_left:
            text = text.rstrip(_SPACE)
        if text:
            items.append(Item("text", text, source.count("\n", 0, pos) + 1))
        if start < 0:
            return items
        line = source.count("\n", 0, start) + 1
        where = f"{name}:{line}"
        cursor = start + (3 if trim_left else 2)
        body = cursor
        while body < len(source) and source[body] in _SPACE:
            body += 1
        if source.startswith("/*", body):
            end = source.find("*/", body)
            if end < 0:
                raise TemplateError(f"{where}: unclosed comment")
            after = end + 2
            if source.startswith(" -}}", after) or source.startswith("\n-}}", after):
                pos, trim_next = after + 4, True
            elif source.startswith("}}", after):
                pos, trim_next = after + 2, False
            else:
                raise TemplateError(f"{where}: comment ends without closing delimiter")
            continue
        tokens, pos, trim_next = _lex_action(source, cursor, where)
        items.append(Item("action", tokens, line))


def _lex_action(source: str, pos: int, where: str) -> tuple[list[Token], int, bool]:
    tokens: list[Token] = []
    while True:
        spaced = False
        while pos < len(source) and source[pos] in _SPACE:
            pos, spaced = pos + 1, True
        if pos >= len(source):
            raise TemplateError(f"{where}: unclosed action")
        if spaced and source.startswith("-}}", pos):
            return tokens, pos + 3, True
        if source.startswith("}}", pos):
            return tokens, pos + 2, False
        c = source[pos]
        if c == '"':
            end = pos + 1
            while end < len(source) and source[end] != '"':
                end += 2 if source[end] == "\\" else 1
            if end >= len(source):
                raise TemplateError(f"{where}: unterminated string")
            tokens.append(Token("string", _go_string(source[pos + 1 : end], where), spaced))
            pos = end + 1
        elif c == "`":
            end = source.find("`", pos + 1)
            if end < 0:
                raise TemplateError(f"{where}: unterminated raw string")
            tokens.append(Token("string", source[pos + 1 : end], spaced))
            pos = end + 1
        elif c in "()|,":
            tokens.append(Token(c, c, spaced))
            pos += 1
        elif source.startswith(":=", pos):
            tokens.append(Token(":=", ":=", spaced))
            pos += 2
        elif c == "=":
            tokens.append(Token("=", "=", spaced))
            pos += 1
        elif c == "$":
            match = _NAME.match(source, pos + 1)
            name = "$" + (match.group(0) if match else "")
            tokens.append(Token("var", name, spaced))
            pos += len(name)
        elif c == "." and _NAME.match(source, pos + 1):
            match = _NAME.match(source, pos + 1)
            tokens.append(Token("field", match.group(0), spaced))
            pos = match.end()
        elif (number := _NUMBER.match(source, pos)) and (c.isdigit() or c in "+-." and number.group(0) not in "+-."):
            text = number.group(0)
            is_float = "." in text or "e" in text.lower()
            tokens.append(Token("number", float(text) if is_float else int(text), spaced))
            pos = number.end()
        elif c == ".":
            tokens.append(Token("dot", ".", spaced))
            pos += 1
        elif match := _NAME.match(source, pos):
            word = match.group(0)
            if word in ("true", "false"):
                tokens.append(Token("bool", word == "true", spaced))
            elif word == "nil":
                tokens.append(Token("nil", None, spaced))
            else:
                tokens.append(Token("keyword" if word in KEYWORDS else "ident", word, spaced))
            pos = match.end()
        else:
            raise TemplateError(f"{where}: unexpected character {c!r} in action")


# -- parsing ------------------------------------------------------------------------------------


@dataclass
class Operand:
    kind: str  # dot field var const ident pipe
    value: object = None
    chain: list[str] = field(default_factory=list)


@dataclass
class Pipe:
    commands: list[list[Operand]]
    decl: list[str] = field(default_factory=list)
    assign: bool = False  # `=` rather than `:=`


@dataclass
class Node:
    kind: str  # text action if range with template
    line: int
    text: str = ""
    pipe: Pipe | None = None
    branches: list = field(default_factory=list)  # if/with: [(pipe, body)]
    body: list = field(default_factory=list)
    else_body: list | None = None
    name: str = ""


class Parser:
    def __init__(self, items: list[Item], name: str, defines: dict) -> None:
        self.items, self.name, self.defines, self.pos = items, name, defines, 0

    def where(self, line: int) -> str:
        return f"{self.name}:{line}"

    def parse(self) -> list[Node]:
        nodes, stop = self.parse_list()
        if stop is not None:
            raise TemplateError(f"{self.where(stop.line)}: unexpected {{{{{stop.value[0].value}}}}}")
        return nodes

    def parse_list(self) -> tuple[list[Node], Item | None]:
        """Nodes up to an `else` or `end` (returned as the stop item) or the end of input."""
        nodes: list[Node] = []
        while self.pos < len(self.items):
            item = self.items[self.pos]
            self.pos += 1
            if item.kind == "text":
                nodes.append(Node("text", item.line, text=item.value))
                continue
            tokens = item.value
            if not tokens:
                raise TemplateError(f"{self.where(item.line)}: empty action")
            head = tokens[0]
            if head.kind != "keyword":
                nodes.append(Node("action", item.line, pipe=self.parse_pipe(tokens, item.line)))
            elif head.value in ("else", "end"):
                return nodes, item
            elif head.value in ("if", "with"):
                nodes.append(self.parse_branches(head.value, tokens[1:], item.line))
            elif head.value == "range":
                nodes.append(self.parse_range(tokens[1:], item.line))
            elif head.value == "define":
                self.parse_define(tokens[1:], item.line)
            elif head.value == "template":
                if len(tokens) < 2 or tokens[1].kind != "string":
                    raise TemplateError(f"{self.where(item.line)}: template needs a quoted name")
                pipe = self.parse_pipe(tokens[2:], item.line) if len(tokens) > 2 else None
                nodes.append(Node("template", item.line, name=tokens[1].value, pipe=pipe))
            else:
                raise TemplateError(f"{self.where(item.line)}: {{{{{head.value}}}}} is not supported by this renderer")
        return nodes, None

    def parse_branches(self, keyword: str, tokens: list[Token], line: int) -> Node:
        node = Node(keyword, line)
        while True:
            pipe = self.parse_pipe(tokens, line)
            body, stop = self.parse_list()
            node.branches.append((pipe, body))
            if stop is None:
                raise TemplateError(f"{self.where(line)}: {{{{{keyword}}}}} without {{{{end}}}}")
            stop_tokens = stop.value
            if stop_tokens[0].value == "end":
                return node
            if len(stop_tokens) > 1 and stop_tokens[1].kind == "keyword" and stop_tokens[1].value == keyword:
                tokens, line = stop_tokens[2:], stop.line  # `else if` / `else with`
                continue
            if len(stop_tokens) > 1:
                raise TemplateError(f"{self.where(stop.line)}: unexpected tokens after else")
            node.else_body, stop = self.parse_list()
            if stop is None or stop.value[0].value != "end":
                raise TemplateError(f"{self.where(line)}: {{{{{keyword}}}}} without {{{{end}}}}")
            return node

    def parse_range(self, tokens: list[Token], line: int) -> Node:
        node = Node("range", line, pipe=self.parse_pipe(tokens, line, allow_two=True))
        node.body, stop = self.parse_list()
        if stop is not None and stop.value[0].value == "else":
            node.else_body, stop = self.parse_list()
        if stop is None or stop.value[0].value != "end":
            raise TemplateError(f"{self.where(line)}: {{{{range}}}} without {{{{end}}}}")
        return node

    def parse_define(self, tokens: list[Token], line: int) -> None:
        if len(tokens) != 1 or tokens[0].kind != "string":
            raise TemplateError(f"{self.where(line)}: define needs exactly one quoted name")
        body, stop = self.parse_list()
        if stop is None or stop.value[0].value != "end" or len(stop.value) != 1:
            raise TemplateError(f"{self.where(line)}: define without {{{{end}}}}")
        self.defines[tokens[0].value] = (body, self.name)

    def parse_pipe(self, tokens: list[Token], line: int, allow_two: bool = False) -> Pipe:
        decl, assign = [], False
        if len(tokens) >= 2 and tokens[0].kind == "var" and tokens[1].kind in (":=", "="):
            decl, assign, tokens = [tokens[0].value], tokens[1].kind == "=", tokens[2:]
        elif (
            allow_two
            and len(tokens) >= 4
            and tokens[0].kind == "var"
            and tokens[1].kind == ","
            and tokens[2].kind == "var"
            and tokens[3].kind == ":="
        ):
            decl, tokens = [tokens[0].value, tokens[2].value], tokens[4:]
        if not tokens:
            raise TemplateError(f"{self.where(line)}: missing value")
        commands, current, depth = [], [], 0
        for token in tokens:
            depth += {"(": 1, ")": -1}.get(token.kind, 0)
            if token.kind == "|" and depth == 0:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
        return Pipe([self.parse_command(c, line) for c in commands], decl, assign)

    def parse_command(self, tokens: list[Token], line: int) -> list[Operand]:
        if not tokens:
            raise TemplateError(f"{self.where(line)}: missing command in pipeline")
        operands, i = [], 0
        while i < len(tokens):
            token = tokens[i]
            if token.kind == "(":
                depth, j = 1, i + 1
                while j < len(tokens) and depth:
                    depth += {"(": 1, ")": -1}.get(tokens[j].kind, 0)
                    j += 1
                if depth:
                    raise TemplateError(f"{self.where(line)}: unclosed parenthesis")
                operand = Operand("pipe", self.parse_pipe(tokens[i + 1 : j - 1], line))
                i = j
            elif token.kind == "field":
                operand = Operand("field", chain=[token.value])
                i += 1
            elif token.kind == "dot":
                operand, i = Operand("dot"), i + 1
            elif token.kind == "var":
                operand, i = Operand("var", token.value), i + 1
            elif token.kind in ("string", "number", "bool", "nil"):
                operand, i = Operand("const", token.value), i + 1
            elif token.kind == "ident":
                operand, i = Operand("ident", token.value), i + 1
            else:
                raise TemplateError(f"{self.where(line)}: unexpected {token.value!r}")
            while i < len(tokens) and tokens[i].kind == "field" and not tokens[i].spaced:
                operand.chain.append(tokens[i].value)
                i += 1
            operands.append(operand)
        return operands


# -- values as Go sees them ---------------------------------------------------------------------


def _float_parts(value: float) -> tuple[str, int]:
    """Shortest round-trip digits and the decimal exponent of the first digit."""
    sign, digits, exponent = Decimal(repr(abs(value))).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    return text, len(digits) + exponent - 1


def go_float(value: float) -> str:
    """fmt's %v of a float64 (strconv 'g', shortest; exponent form from 1e+06 and below 1e-04)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    digits, exp = _float_parts(value)
    if exp < -4 or exp >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    fixed = format(Decimal(repr(abs(value))), "f")
    if "." in fixed:
        fixed = fixed.rstrip("0").rstrip(".")
    return sign + fixed


def json_number(value) -> str:
    """encoding/json's rendering of a number: plain digits from 1e-6 up to 1e21."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        raise TemplateError(f"json: unsupported value: {go_float(value)}")
    magnitude = abs(value)
    if magnitude == 0 or 1e-6 <= magnitude < 1e21:
        if value == int(value):
            return str(int(value))
        return ("-" if value < 0 else "") + format(Decimal(repr(magnitude)), "f")
    digits, exp = _float_parts(value)
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{'-' if value < 0 else ''}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp)}"


def go_print(value, nested: bool = False) -> str:
    """fmt's %v; a missing value prints as "" (Helm replaces Go's "<no value>")."""
    if value is None:
        return "<nil>" if nested else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + " ".join(go_print(v, True) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_print(value[k], True)}" for k in sorted(value)) + "]"
    raise TemplateError(f"cannot print a {type(value).__name__}")


def go_quote(text: str) -> str:
    """strconv.Quote for the printable text charts hold."""
    return json.dumps(text, ensure_ascii=False)


def truthy(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    return True


def _kind(value) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "other"


def _comparable(a, b, op: str) -> None:
    ka, kb = _kind(a), _kind(b)
    if ka == "other" or kb == "other":
        raise TemplateError(f"{op}: uncomparable type {type(a if ka == 'other' else b).__name__}")
    if ka != kb and "nil" not in (ka, kb):
        # Go refuses to compare an int literal with a float64 from values: so does this.
        raise TemplateError(f"{op}: incompatible types for comparison ({ka} and {kb})")


def _eq(a, *others):
    if not others:
        raise TemplateError("eq: missing argument for comparison")
    for b in others:
        _comparable(a, b, "eq")
        if a == b:
            return True
    return False


def _ordered(op: str, test):
    def compare(a, b):
        _comparable(a, b, op)
        if _kind(a) in ("nil", "bool"):
            raise TemplateError(f"{op}: invalid type for comparison")
        return test(a, b)

    return compare


# -- Sprig / Helm functions ---------------------------------------------------------------------


def _empty(value) -> bool:
    return not truthy(value)


def _to_int(value) -> int:
    if value is None:
        return 0
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value)) if value.strip() else 0
        except ValueError:
            return 0
    raise TemplateError(f"int: cannot convert {type(value).__name__}")


def _strval(value) -> str:
    return go_print(value) if value is not None else "<nil>"


def _plain(value):
    """Values as JSON/YAML see them: float64s that are whole become integers again."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_json(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json_number(value)
    if isinstance(value, str):
        # encoding/json escapes HTML characters by default.
        return (
            json.dumps(value, ensure_ascii=False)
            .replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
        )
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{to_json(str(k))}:{to_json(value[k])}" for k in sorted(value)) + "}"
    raise TemplateError(f"toJson: unsupported {type(value).__name__}")


def to_yaml(value) -> str:
    text = yaml.safe_dump(_plain(value), sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 30)
    if text.endswith("\n...\n"):
        text = text[:-4]
    return text.rstrip("\n")


def _indent(spaces, text) -> str:
    pad = " " * _to_int(spaces)
    return pad + str(text).replace("\n", "\n" + pad)


def _printf(fmt: str, *args) -> str:
    out, args, i = [], list(args), 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        verb = fmt[i + 1 : i + 2]
        i += 2
        if verb == "%":
            out.append("%")
            continue
        if not args:
            raise TemplateError(f"printf: missing argument for %{verb}")
        arg = args.pop(0)
        if verb in ("s", "v"):
            out.append(go_print(arg, nested=True))
        elif verb == "d" and isinstance(arg, int) and not isinstance(arg, bool):
            out.append(str(arg))
        elif verb == "q" and isinstance(arg, str):
            out.append(go_quote(arg))
        else:
            raise TemplateError(f"printf: %{verb} of {_kind(arg)} is not supported (Go would print %!{verb})")
    if args:
        raise TemplateError(f"printf: {len(args)} extra argument(s)")
    return "".join(out)


def _sprint(*values) -> str:
    """fmt.Sprint: a space between two operands when neither is a string."""
    out = []
    for i, value in enumerate(values):
        if i and not isinstance(value, str) and not isinstance(values[i - 1], str):
            out.append(" ")
        out.append(go_print(value, nested=True))
    return "".join(out)


def _trunc(count, text: str) -> str:
    count = _to_int(count)
    if count < 0:
        return text[len(text) + count :] if len(text) + count > 0 else text
    return text[:count]


def _dict(*pairs) -> dict:
    if len(pairs) % 2:
        pairs = pairs + ("",)
    return {_strval(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}


def _required(message: str, value):
    if value is None or (isinstance(value, str) and value == ""):
        raise TemplateError(message)
    return value


def _fail(message: str):
    raise TemplateError(message)


def _index(collection, *keys):
    for key in keys:
        if isinstance(collection, dict):
            collection = collection.get(key)
        elif isinstance(collection, list):
            collection = collection[_to_int(key)]
        else:
            raise TemplateError(f"index: cannot index {type(collection).__name__}")
    return collection


def _int64_op(name: str, op):
    def apply(*values):
        result = _to_int(values[0])
        for value in values[1:]:
            result = op(result, _to_int(value))
        return result

    apply.__name__ = name
    return apply


FUNCTIONS = {
    # Go builtins
    "not": lambda v: not truthy(v),
    "len": lambda v: len(v),
    "index": _index,
    "print": _sprint,
    "printf": _printf,
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": _ordered("lt", lambda a, b: a < b),
    "le": _ordered("le", lambda a, b: a <= b),
    "gt": _ordered("gt", lambda a, b: a > b),
    "ge": _ordered("ge", lambda a, b: a >= b),
    # Sprig
    "default": lambda d, *given: d if not given or _empty(given[0]) else given[0],
    "empty": _empty,
    "required": _required,
    "fail": _fail,
    "quote": lambda *v: " ".join(go_quote(_strval(x)) for x in v if x is not None),
    "squote": lambda *v: " ".join(f"'{_strval(x)}'" for x in v if x is not None),
    "int": _to_int,
    "int64": _to_int,
    "toString": _strval,
    "add": _int64_op("add", lambda a, b: a + b),
    "sub": _int64_op("sub", lambda a, b: a - b),
    "mul": _int64_op("mul", lambda a, b: a * b),
    "max": _int64_op("max", max),
    "min": _int64_op("min", min),
    "trunc": _trunc,
    "trimSuffix": lambda suffix, s: s[: -len(suffix)] if suffix and s.endswith(suffix) else s,
    "trimPrefix": lambda prefix, s: s[len(prefix) :] if prefix and s.startswith(prefix) else s,
    "trim": lambda s: s.strip(),
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "replace": lambda old, new, s: s.replace(old, new),
    "contains": lambda sub, s: sub in s,
    "hasPrefix": lambda prefix, s: s.startswith(prefix),
    "join": lambda sep, values: sep.join(_strval(v) for v in (values or [])),
    "list": lambda *v: list(v),
    "dict": _dict,
    "hasKey": lambda d, k: k in d,
    "omit": lambda d, *keys: {k: v for k, v in d.items() if k not in keys},
    "b64enc": lambda s: base64.b64encode(_strval(s).encode()).decode(),
    "sha256sum": lambda s: hashlib.sha256(_strval(s).encode()).hexdigest(),
    "toJson": to_json,
    "toYaml": to_yaml,
    "indent": _indent,
    "nindent": lambda n, s: "\n" + _indent(n, s),
}
_LAZY = {"and", "or"}


# -- execution ----------------------------------------------------------------------------------


class TemplateSet:
    """Named templates (from `define` and from whole files) that can include each other."""

    def __init__(self) -> None:
        self.defines: dict[str, tuple[list[Node], str]] = {}
        self.files: dict[str, list[Node]] = {}

    def add(self, name: str, source: str) -> None:
        nodes = Parser(lex(source, name), name, self.defines).parse()
        self.files[name] = nodes

    def render(self, name: str, data) -> str:
        return self._run(self.files[name], name, data)

    def _run(self, nodes: list[Node], name: str, data) -> str:
        out: list[str] = []
        _Exec(self, name).nodes(nodes, data, [("$", data)], out)
        return "".join(out)

    def include(self, name: str, data) -> str:
        if name not in self.defines:
            raise TemplateError(f'no template "{name}" is defined')
        body, origin = self.defines[name]
        return self._run(body, origin, data)


class _Exec:
    def __init__(self, templates: TemplateSet, name: str) -> None:
        self.templates, self.name, self.line = templates, name, 0

    def fail(self, message: str) -> TemplateError:
        return TemplateError(f"{self.name}:{self.line}: {message}")

    def nodes(self, nodes: list[Node], dot, scope: list, out: list[str]) -> None:
        for node in nodes:
            self.line = node.line
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "action":
                value = self.pipe(node.pipe, dot, scope)
                if not node.pipe.decl:
                    out.append(go_print(value))
            elif node.kind in ("if", "with"):
                self.branches(node, dot, scope, out)
            elif node.kind == "range":
                self.range(node, dot, scope, out)
            elif node.kind == "template":
                value = self.pipe(node.pipe, dot, scope) if node.pipe else None
                try:
                    out.append(self.templates.include(node.name, value))
                except TemplateError as exc:
                    raise self.fail(str(exc)) from None

    def branches(self, node: Node, dot, scope: list, out: list[str]) -> None:
        mark = len(scope)
        for pipe, body in node.branches:
            value = self.pipe(pipe, dot, scope)
            if truthy(value):
                self.nodes(body, value if node.kind == "with" else dot, scope, out)
                del scope[mark:]
                return
        if node.else_body is not None:
            self.nodes(node.else_body, dot, scope, out)
        del scope[mark:]

    def range(self, node: Node, dot, scope: list, out: list[str]) -> None:
        mark = len(scope)
        decl = node.pipe.decl
        collection = self.pipe(Pipe(node.pipe.commands), dot, scope)
        if isinstance(collection, dict):
            pairs = [(k, collection[k]) for k in sorted(collection)]
        elif isinstance(collection, list):
            pairs = list(enumerate(collection))
        elif collection is None:
            pairs = []
        else:
            raise self.fail(f"range can't iterate over {go_print(collection)}")
        for key, value in pairs:
            if len(decl) == 2:
                scope += [(decl[0], key), (decl[1], value)]
            elif decl:
                scope.append((decl[0], value))
            self.nodes(node.body, value, scope, out)
            del scope[mark:]
        if not pairs and node.else_body is not None:
            self.nodes(node.else_body, dot, scope, out)
            del scope[mark:]

    def pipe(self, pipe: Pipe, dot, scope: list):
        value, piped = None, False
        for command in pipe.commands:
            value = self.command(command, dot, scope, value if piped else _NO_ARG)
            piped = True
        if pipe.decl:
            name = pipe.decl[0]
            if pipe.assign:
                for i in range(len(scope) - 1, -1, -1):
                    if scope[i][0] == name:
                        scope[i] = (name, value)
                        break
                else:
                    raise self.fail(f"undefined variable: {name}")
            else:
                scope.append((name, value))
        return value

    def command(self, operands: list[Operand], dot, scope: list, piped):
        first = operands[0]
        if first.kind == "ident":
            return self.call(first.value, operands[1:], dot, scope, piped)
        if len(operands) > 1 or piped is not _NO_ARG:
            raise self.fail("can't give argument to non-function")
        return self.operand(first, dot, scope)

    def call(self, name: str, arg_operands: list[Operand], dot, scope: list, piped):
        if name in _LAZY:
            # Go 1.18+: `and` / `or` stop at the first argument that decides the result.
            thunks = [lambda o=o: self.operand(o, dot, scope) for o in arg_operands]
            if piped is not _NO_ARG:
                thunks.append(lambda: piped)
            if not thunks:
                raise self.fail(f"{name}: missing arguments")
            for thunk in thunks:
                result = thunk()
                if truthy(result) != (name == "and"):
                    return result
            return result
        args = [self.operand(o, dot, scope) for o in arg_operands]
        if piped is not _NO_ARG:
            args.append(piped)
        if name == "include":
            if len(args) != 2:
                raise self.fail("include needs a name and a value")
            try:
                return self.templates.include(args[0], args[1])
            except TemplateError as exc:
                raise self.fail(str(exc)) from None
        function = FUNCTIONS.get(name)
        if function is None:
            raise self.fail(f'function "{name}" not defined (not supported by this renderer)')
        try:
            return function(*args)
        except TemplateError as exc:
            raise self.fail(str(exc)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise self.fail(f"error calling {name}: {exc}") from None

    def operand(self, operand: Operand, dot, scope: list):
        if operand.kind == "dot" or operand.kind == "field":
            value = dot
        elif operand.kind == "var":
            for name, bound in reversed(scope):
                if name == operand.value:
                    value = bound
                    break
            else:
                raise self.fail(f"undefined variable: {operand.value}")
        elif operand.kind == "const":
            value = operand.value
        elif operand.kind == "ident":
            value = self.call(operand.value, [], dot, scope, _NO_ARG)
        else:
            value = self.pipe(operand.value, dot, scope)
        for name in operand.chain:
            if isinstance(value, dict):
                value = value.get(name)
            elif value is None:
                raise self.fail(f"nil pointer evaluating interface {{}}.{name}")
            else:
                raise self.fail(f"can't evaluate field {name} in type {type(value).__name__}")
        return value


_NO_ARG = object()
