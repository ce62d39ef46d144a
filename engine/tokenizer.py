"""Text ↔ token ids, chat templates, and streaming detokenization.

This module imports neither torch nor transformers: the router uses it too.
"""

from __future__ import annotations

import codecs
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, processors

from contract.errors import FieldError
from engine.errors import InvalidRequestError, ModelLoadError

REPLACEMENT_CHAR = "\ufffd"

# Used by ByteTokenizer, and by HFTokenizer when the model ships no template.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The named special tokens transformers passes to chat templates and skips when decoding.
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer(ABC):
    """Converts between text and token ids for one model.

    A tokenizer is not mutated after construction. ``decode`` is the reference text of a sequence of
    ids: ``IncrementalDetokenizer`` streams exactly what ``decode`` returns.

    Attributes:
        vocab_size: number of ids the tokenizer can decode.
        bos_token_id: the beginning-of-sequence id, or None if the model has none.
        eos_token_ids: every id that ends generation (a model may have several).
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` adds BOS (or EOS) where the tokenizer's config says so."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids`` (each in ``[0, vocab_size)``); bytes that are not valid UTF-8 become U+FFFD.

        ``skip_special_tokens`` drops BOS/EOS/pad/unk and every added token marked special.
        """

    @abstractmethod
    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """The raw bytes ``token_id`` stands for on its own, which may be part of a UTF-8 character (where
        ``decode([token_id])`` shows U+FFFD); a special token's text, or nothing when skipped."""

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        documents: list[dict] | None = None,
    ) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) as prompt text.

        Many templates already emit ``bos_token``: encode their output with ``add_special_tokens=False``
        unless the model needs encode's BOS too. ``tools`` (OpenAI tool definitions) reach the template as
        transformers passes them; see ``supports_tools``. ``continue_final_message``, ``template_kwargs`` and
        ``documents``: see ``ChatTemplate.render``. Raises InvalidRequestError when the template rejects the
        conversation, FieldError for a field the template cannot honour.
        """
        return self._chat_template.render(
            messages,
            add_generation_prompt,
            self._template_tokens(),
            tools,
            continue_final_message,
            template_kwargs,
            documents,
        )

    @abstractmethod
    def _template_tokens(self) -> dict[str, str]:
        """The named special tokens' text a chat template reads (``bos_token``, ``eos_token``, ...)."""

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether ``decode(..., skip_special_tokens=True)`` drops ``token_id``."""

    @property
    def chat_template_source(self) -> str:
        """The text of the chat template ``apply_chat_template`` renders (the model's or the built-in one)."""
        return self._chat_template.source

    @property
    def template_variables(self) -> frozenset[str]:
        """What a request's chat_template_kwargs may set: the variables the chat template reads that nobody else
        sets (a Qwen3 template's ``enable_thinking``)."""
        return self._chat_template.extra_variables

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tool definitions (it reads the ``tools`` variable)."""
        return self._chat_template.reads_tools

    @property
    def supports_tool_calls(self) -> bool:
        """Whether the chat template renders earlier tool calls: it reads an assistant message's ``tool_calls``
        (as Hugging Face templates do, each ``{"id", "type", "function": {"name", "arguments": dict}}``).
        Tool results are messages with ``role`` ``tool``, ``content`` and ``tool_call_id``."""
        return self._chat_template.reads_tool_calls

    @property
    def developer_role(self) -> str:
        """The role an OpenAI developer message has in the chat template: its own where the template names it,
        else system, which OpenAI's developer messages replace."""
        return "developer" if self._chat_template.names_developer else "system"


class ChatTemplate:
    """A Hugging Face style jinja chat template, compiled once.

    Rendered the way transformers renders it (immutable sandbox, trim_blocks, lstrip_blocks, loop controls,
    ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML), so templates shipped with
    a model produce the same prompt here as there. Raises ``jinja2.TemplateSyntaxError`` if ``source``
    does not compile.
    """

    def __init__(self, source: str):
        self.source = source  # the text, for the model card's fingerprint
        environment = _sandbox()
        self._template = environment.from_string(source)
        parsed = environment.parse(source)
        read = jinja2.meta.find_undeclared_variables(parsed)
        self.reads_tools = "tools" in read
        self.reads_documents = "documents" in read
        self.reads_tool_calls = _reads_key(parsed, "tool_calls")
        # Whether it renders OpenAI's developer role as its own: most name only system, which developer replaces.
        self.names_developer = any(node.value == "developer" for node in parsed.find_all(jinja2.nodes.Const))
        # What a request's chat_template_kwargs may set: the variables the template reads that nobody else sets.
        self._reserved = _SET_BY_RENDER | set(environment.globals)
        self.extra_variables = frozenset(read - self._reserved)

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool,
        special_tokens: dict[str, str],
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        documents: list[dict] | None = None,
    ) -> str:
        """Prompt text; ``special_tokens`` maps names like ``bos_token`` to their text.

        ``template_kwargs`` sets variables the template reads beyond what render sets (``extra_variables``,
        e.g. a Qwen3 template's ``enable_thinking``); any other name is a FieldError naming chat_template_kwargs.
        ``continue_final_message`` renders the conversation up to the final (assistant) message's content and
        leaves that message open for the model to continue, cut where transformers cuts it. A message's ``name``
        reaches the template; FieldError naming the first where the template renders the same without them.
        ``documents`` (retrieved passages, as transformers passes them) need a template that reads them."""
        if documents and not self.reads_documents:
            raise FieldError("documents", "the model's chat template does not render documents")
        kwargs = dict(template_kwargs or {})
        for name in kwargs:
            if name not in self.extra_variables:
                raise FieldError("chat_template_kwargs", self._not_settable(name))
        said = _continued(messages, add_generation_prompt) if continue_final_message else messages

        def rendered(conversation: list[dict]) -> str:
            try:
                return self._template.render(
                    messages=conversation,
                    add_generation_prompt=add_generation_prompt,
                    tools=tools,
                    documents=documents,
                    **special_tokens,
                    **kwargs,
                )
            except Exception as exc:  # the template is the model's code: any failure means it rejects these messages
                raise InvalidRequestError(f"chat template cannot render these messages: {exc}") from exc

        text = rendered(said)
        named = [i for i, message in enumerate(said) if message.get("name") is not None]
        if named and rendered([{k: v for k, v in m.items() if k != "name"} for m in said]) == text:
            raise FieldError(
                f"messages.{named[0]}.name",
                "the model's chat template does not render names, so the model would not see it",
            )
        return _cut_at_tag(text, messages[-1]["content"]) if continue_final_message else text

    def _not_settable(self, name: str) -> str:
        if name in self._reserved:
            return f"chat_template_kwargs.{name} is set by the server" + (
                " (send add_generation_prompt)" if name == "add_generation_prompt" else ""
            )
        readable = ", ".join(sorted(self.extra_variables)) or "none"
        return f"the model's chat template does not read {name!r} (chat_template_kwargs it reads: {readable})"


# Variables ChatTemplate.render sets itself (and with the environment's globals, no request overrides them).
_SET_BY_RENDER = frozenset({"messages", "add_generation_prompt", "tools", "documents", *_NAMED_SPECIAL_TOKENS})


def _continued(messages: list[dict], add_generation_prompt: bool) -> list[dict]:
    """The conversation with ``_CONTINUE_TAG`` after the final (assistant) message's content, which
    continue_final_message continues; FieldError if it cannot be."""
    if add_generation_prompt:
        raise FieldError(
            "continue_final_message", "continue_final_message and add_generation_prompt cannot both be true"
        )
    final = messages[-1] if messages else {}
    if final.get("role") != "assistant" or final.get("tool_calls") or not isinstance(final.get("content"), str):
        raise FieldError(
            "continue_final_message", "continue_final_message needs the last message to be an assistant's text"
        )
    return [*messages[:-1], {**final, "content": final["content"] + _CONTINUE_TAG}]


# Where the final message's content ends, as transformers marks it: the prompt is cut there (before the tag, or
# where a template trimmed the tag's space, before the whitespace it trimmed).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _cut_at_tag(text: str, content: str) -> str:
    if content.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise FieldError(
            "continue_final_message", "the model's chat template does not render the final message's content as sent"
        )
    where = text.rindex(_CONTINUE_TAG.strip())
    return text[:where] if text[where : where + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:where].rstrip()


def _reads_key(parsed: jinja2.nodes.Template, key: str) -> bool:
    """Whether a template reads ``key`` of some object (``x.key``, ``x['key']`` or ``'key' in x``)."""
    return any(node.attr == key for node in parsed.find_all(jinja2.nodes.Getattr)) or any(
        node.value == key for node in parsed.find_all(jinja2.nodes.Const)
    )


def _sandbox() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer for the built-in presets; needs no files.

    ::

        id:    0      1     2      3 .. 258       259 .. vocab_size-1
               <pad>  <s>   </s>   bytes 0..255   alias byte (id - 3) % 256

    Preset models have vocabularies of up to 32000 and dummy weights may sample any of those ids, so ids
    past 258 alias bytes instead of being invalid. ``encode`` never produces them (nor <pad>/<s>/</s> from
    text). Decoding is UTF-8 with invalid bytes replaced by U+FFFD.
    """

    PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
    FIRST_BYTE_ID = 3
    _SPECIAL_TEXT = (b"<pad>", b"<s>", b"</s>")
    _SINGLE_BYTES = tuple(bytes([b]) for b in range(256))

    def __init__(self, vocab_size: int):
        if vocab_size < self.FIRST_BYTE_ID + 256:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {self.FIRST_BYTE_ID + 256}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = self.BOS_ID
        self.eos_token_ids = (self.EOS_ID,)
        self._chat_template = ChatTemplate(BUILTIN_CHAT_TEMPLATE)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.FIRST_BYTE_ID + b for b in text.encode("utf-8")]
        return [self.BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(self.token_bytes(t, skip_special_tokens) for t in token_ids)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        if token_id < self.FIRST_BYTE_ID:
            return b"" if skip_special_tokens else self._SPECIAL_TEXT[token_id]
        return self._SINGLE_BYTES[(token_id - self.FIRST_BYTE_ID) % 256]

    def _template_tokens(self) -> dict[str, str]:
        return {"bos_token": "<s>", "eos_token": "</s>"}

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.FIRST_BYTE_ID


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer read without transformers.

    ``tokenizer.json`` is run by the ``tokenizers`` library; ``tokenizer_config.json`` supplies the chat
    template (``chat_template.jinja`` wins if present), the named special tokens, ``added_tokens_decoder``,
    and ``add_bos_token`` / ``add_eos_token``: when present these replace tokenizer.json's post-processor, as
    transformers v4's Llama-family tokenizers do (v5 ignores them and trusts tokenizer.json).

    EOS ids are the tokenizer's ``eos_token`` plus ``eos_token_id`` (int or list) from the model's
    ``generation_config.json`` and ``config.json``. ``clean_up_tokenization_spaces`` is not applied: it would
    make decoding non-incremental.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        tokenizer_config: dict[str, Any],
        chat_template: ChatTemplate | None = None,
        model_eos_ids: Sequence[int] = (),
    ):
        """Takes ownership of ``backend`` (its post-processor may be replaced)."""
        self._backend = backend
        self._token_text = {name: _token_content(tokenizer_config.get(name)) for name in _NAMED_SPECIAL_TOKENS}
        self._chat_template = chat_template or ChatTemplate(BUILTIN_CHAT_TEMPLATE)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._id_of(self._token_text["bos_token"])
        eos_ids = [self._id_of(self._token_text["eos_token"]), *model_eos_ids]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self._special_ids = self._collect_special_ids(tokenizer_config)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        if "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config:
            add_bos, add_eos = tokenizer_config.get("add_bos_token"), tokenizer_config.get("add_eos_token")
            self._set_post_processor(bool(add_bos), bool(add_eos))

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load from a local model directory; missing or malformed files raise ModelLoadError naming the file."""
        directory = Path(path)
        if not directory.is_dir():
            raise ModelLoadError(f"tokenizer directory {directory} does not exist")
        backend = _load_backend(directory / "tokenizer.json")
        config_path = directory / "tokenizer_config.json"
        config = _read_json_object(config_path)
        model_eos_ids = _eos_ids_in(directory / "generation_config.json") + _eos_ids_in(directory / "config.json")
        template = _load_chat_template(directory, config)
        try:
            return cls(backend, config, template, model_eos_ids)
        except (TypeError, ValueError, AttributeError) as exc:  # wrong field types in the config
            raise ModelLoadError(f"{config_path} is malformed: {exc}") from exc

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def to_json(self) -> str:
        """The backend tokenizer as tokenizer.json text (what grammar engines read a vocabulary from)."""
        return self._backend.to_str()

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            token_ids = [t for t in token_ids if t not in self._special_ids]
        return self._backend.decode(list(token_ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        if skip_special_tokens and token_id in self._special_ids:
            return b""
        text = self._backend.decode([token_id], skip_special_tokens=False)
        if REPLACEMENT_CHAR not in text:
            return text.encode("utf-8")
        # Part of a character: the vocabulary's own spelling of the bytes (byte-fallback <0xNN>, or GPT-2's
        # byte-level alphabet), not the U+FFFD that decoding one token alone shows.
        piece = self._backend.id_to_token(token_id) or ""
        if fallback := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(fallback.group(1), 16)])
        if self._byte_level and all(char in _BYTE_LEVEL_BYTES for char in piece):
            return bytes(_BYTE_LEVEL_BYTES[char] for char in piece)
        return text.encode("utf-8")

    def _template_tokens(self) -> dict[str, str]:
        return {name: text for name, text in self._token_text.items() if text is not None}

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _collect_special_ids(self, tokenizer_config: dict[str, Any]) -> frozenset[int]:
        ids = {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}
        for key, entry in tokenizer_config.get("added_tokens_decoder", {}).items():
            if entry.get("special"):
                ids.add(int(key))
        named = (self._id_of(text) for text in self._token_text.values())
        return frozenset(ids | {i for i in named if i is not None})

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        before = self._known_token("bos_token") if add_bos else []
        after = self._known_token("eos_token") if add_eos else []
        single = [f"{text}:0" for text, _ in before] + ["$A:0"] + [f"{text}:0" for text, _ in after]
        self._backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), special_tokens=before + after
        )

    def _known_token(self, name: str) -> list[tuple[str, int]]:
        text = self._token_text[name]
        token_id = self._id_of(text)
        return [] if token_id is None else [(text, token_id)]


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, read backwards: each byte is spelled as one printable character (the
    printable Latin-1 bytes as themselves, the rest as U+0100 onwards, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    spelling = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {char: b for b, char in spelling.items()}


_BYTE_LEVEL_BYTES = _byte_level_alphabet()

_SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """HFTokenizer for a directory containing tokenizer.json; ByteTokenizer(vocab_size) for one with
    no tokenizer files at all (a bare checkpoint). A directory with only a slow tokenizer is an error:
    silently serving bytes instead of the model's vocabulary would be wrong output."""
    if model_dir is None:
        return ByteTokenizer(vocab_size)
    directory = Path(model_dir)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(directory)
    present = [name for name in _SLOW_TOKENIZER_FILES if (directory / name).is_file()]
    if present:
        raise ModelLoadError(
            f"{str(directory)!r} has {', '.join(present)} but no tokenizer.json; convert it once with "
            "transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) and retry"
        )
    return ByteTokenizer(vocab_size)


def _token_content(value: str | dict | None) -> str | None:
    # tokenizer_config.json writes a special token either as its text or as a serialized AddedToken.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TypeError(f"a special token must be a string or an AddedToken object, got {value!r}")


def _load_backend(path: Path) -> BackendTokenizer:
    if not path.is_file():
        raise ModelLoadError(f"{path} not found (a Hugging Face fast tokenizer file is required)")
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers reports every parse failure as a bare Exception
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when the file does not exist (every such file is optional)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must contain a JSON object")
    return value


def _eos_ids_in(path: Path) -> tuple[int, ...]:
    value = _read_json_object(path).get("eos_token_id")
    ids = [value] if value is None or isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids if i is not None):
        raise ModelLoadError(f"{path}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return tuple(i for i in ids if i is not None)


def _load_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> ChatTemplate | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return _compile_template(jinja_file.read_text(encoding="utf-8"), jinja_file)
    source = _default_template(tokenizer_config.get("chat_template"))
    return None if source is None else _compile_template(source, directory / "tokenizer_config.json")


def _compile_template(source: str, origin: Path) -> ChatTemplate:
    try:
        return ChatTemplate(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"{origin}: the chat template does not compile: {exc}") from exc


def _default_template(value: str | list | None) -> str | None:
    # Some models ship several named templates; "default" is the one for plain chat.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    raise ModelLoadError(f"tokenizer_config.json: chat_template must be a string or a list, not {value!r}")


class IncrementalDetokenizer:
    """Streams the text of generated tokens, one token at a time.

    Contract: no piece returned by ``push`` ends in an incomplete UTF-8 character (it never carries a U+FFFD
    that a later token could still turn into a real character), and the concatenation of every ``push``
    result plus ``flush()`` equals ``tokenizer.decode(all_pushed_ids, skip_special_tokens)`` exactly.
    ``push`` costs O(a few tokens), not O(tokens so far), except that with an HFTokenizer a run of tokens whose
    text keeps ending in U+FFFD (invalid bytes) widens the window until one does not.

    Call ``flush`` once, after the last ``push``. One instance per sequence; not thread-safe.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._pieces: list[str] = []
        self._emitted_chars = 0
        if isinstance(tokenizer, ByteTokenizer):
            self._stream: _Utf8Stream | _WindowStream = _Utf8Stream(tokenizer, skip_special_tokens)
        else:
            self._stream = _WindowStream(tokenizer, skip_special_tokens)

    def push(self, token_id: int) -> str:
        """New text that is safe to emit now ('' if none yet)."""
        self._ids.append(token_id)
        return self._emit(self._stream.push(self._ids))

    def flush(self) -> str:
        """Whatever is still held back (e.g. an unfinished character, rendered as U+FFFD like decode does)."""
        full_text = self._tokenizer.decode(self._ids, self._skip_special_tokens)
        return self._emit(full_text[self._emitted_chars :])

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _emit(self, piece: str) -> str:
        self._pieces.append(piece)
        self._emitted_chars += len(piece)
        return piece


class _Utf8Stream:
    """ByteTokenizer: an incremental UTF-8 decoder, O(1) per token even on runs of invalid bytes."""

    def __init__(self, tokenizer: ByteTokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int]) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(ids[-1], self._skip_special_tokens))


class _WindowStream:
    """Any tokenizer: decode a short window of ids and emit what the newest ids added.

    ::

        ids:  ...emitted... | context | unread |
                            ^prefix   ^read    ^len(ids)
        piece = decode(ids[prefix:])[len(decode(ids[prefix:read])):]

    The context tokens give decoders that look at neighbours (SentencePiece drops the leading space of the
    first token) the surroundings they had when that text was emitted. A window ending in U+FFFD may be an
    unfinished character, so nothing is emitted and the window grows until a later token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, ids: list[int]) -> str:
        context_text = self._tokenizer.decode(ids[self._prefix_offset : self._read_offset], self._skip_special_tokens)
        window_text = self._tokenizer.decode(ids[self._prefix_offset :], self._skip_special_tokens)
        if len(window_text) <= len(context_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return window_text[len(context_text) :]
