"""A reasoning model's thinking, split from its answer (``--reasoning-parser``): a chat completion returns it as
``reasoning_content`` (the message's, and each streamed delta's), beside ``content``, as vLLM's reasoning parsers and
DeepSeek's API do; a response as a reasoning item; a message as a thinking block. Where the thinking starts and ends
is engine/thinking.py's rule, which the sampler follows on the tokens and this module on the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import FieldError
from engine.thinking import CLOSE, OPEN, Thinking

NOT_THINKING = "the served model's thinking is not told from its answer (the server runs --reasoning-parser none)"
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # OpenAI's reasoning efforts
DEFAULT_EFFORT = "medium"  # OpenAI's, where a request names none


@dataclass(frozen=True)
class ThinkingAsked:
    """What a request asks of a reasoning model's thinking: variables of its chat template (``enable_thinking``,
    ``reasoning_effort``, where the template reads them) and a budget of thinking tokens
    (``SamplingParams.thinking_token_budget``)."""

    template_kwargs: dict[str, bool | str]
    budget: int | None = None


def no_thinking(thinks: bool, template_variables: frozenset[str]) -> ThinkingAsked:
    """No thinking: the template asked not to open it (``enable_thinking`` false, where it reads one), and one the
    model opens anyway closed at once (a budget of 0). A model the server does not read as thinking is asked
    nothing."""
    if not thinks:
        return ThinkingAsked({})
    return ThinkingAsked({"enable_thinking": False} if "enable_thinking" in template_variables else {}, 0)


def effort_asked(effort: str | None, field: str, thinks: bool, template_variables: frozenset[str]) -> ThinkingAsked:
    """OpenAI's reasoning effort (chat's ``reasoning_effort``, a response's ``reasoning.effort``): the chat template's
    ``reasoning_effort`` where it reads one (gpt-oss's does); else ``"none"`` is no thinking (``no_thinking``),
    ``"medium"`` (OpenAI's default) the model's own thinking, and another level, which only the model's template
    could say how to think at, is a FieldError naming ``field``."""
    if effort is None:
        return ThinkingAsked({})
    if effort not in EFFORTS:
        raise FieldError(field, f"{field} must be one of {', '.join(EFFORTS)}")
    if "reasoning_effort" in template_variables:
        return ThinkingAsked({"reasoning_effort": effort})
    if effort == "none":
        return no_thinking(thinks, template_variables)
    if effort == DEFAULT_EFFORT:  # OpenAI's default level: the model's own thinking, all a model without levels has
        return ThinkingAsked({})
    raise FieldError(
        field,
        f"{field} {effort!r} is not offered: the model's chat template reads no reasoning_effort"
        + ("" if thinks else f", and {NOT_THINKING}"),
    )


def splitter(thinking: Thinking | None) -> Splitter | None:
    """A splitter of the output's text (None without a reasoning parser: all of it is answer)."""
    return None if thinking is None else Splitter(thinking.inside)


class Splitter:
    """One choice's output text, split into thinking and answer as it comes (a tag split across pieces is held
    back until it is whole or cannot be)."""

    def __init__(self, inside: bool) -> None:
        self.inside = inside
        self._at_start = not inside  # an output that starts with <think> opens the thinking
        self._held = ""

    def feed(self, text: str, last: bool = False) -> tuple[str, str]:
        """(thinking, answer) of the next piece of text (``last``: and of what was held back, the text ending)."""
        if last:
            thinking, answer = self.feed(text)
            held_thinking, held_answer = self.end()
            return thinking + held_thinking, answer + held_answer
        text, self._held = self._held + text, ""
        if self._at_start:
            if OPEN.startswith(text):
                self._held = text  # "<thi…": not yet told
                return "", ""
            self._at_start = False
            if text.startswith(OPEN):
                self.inside, text = True, text[len(OPEN) :]
        if not self.inside:
            return "", text
        end = text.find(CLOSE)
        if end >= 0:
            self.inside = False
            return text[:end], text[end + len(CLOSE) :]
        kept = len(text) - _partial_tag(text, CLOSE)
        self._held = text[kept:]
        return text[:kept], ""

    def end(self) -> tuple[str, str]:
        """(thinking, answer) of what was held back when the text ends."""
        held, self._held = self._held, ""
        return (held, "") if self.inside else ("", held)

    def split(self, text: str) -> tuple[str, str]:
        """A whole text's (thinking, answer)."""
        return self.feed(text, last=True)


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that starts ``tag`` (a tag not yet whole)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def split(thinking: Thinking | None, text: str) -> tuple[str, str]:
    """A whole output text's (thinking, answer): all answer without a reasoning parser (``thinking`` None)."""
    return ("", text) if thinking is None else Splitter(thinking.inside).split(text)


def pieces(splitter: Splitter | None, text: str, last: bool) -> tuple[str, str]:
    """The (thinking, answer) of a streamed piece of text (``last``: the output's last); all answer without one."""
    return ("", text) if splitter is None else splitter.feed(text, last)


def with_template_kwargs(asked: ThinkingAsked, template_kwargs: dict | None, field: str) -> dict:
    """The chat template's variables: what the thinking asks, and ``template_kwargs`` (the request's
    chat_template_kwargs) beside them; FieldError naming ``field`` where both set one differently."""
    merged = dict(asked.template_kwargs)
    for name, value in (template_kwargs or {}).items():
        if name in merged and merged[name] != value:
            raise FieldError(field, f"{field} sets chat_template_kwargs.{name} to {merged[name]!r}: it may not differ")
        merged[name] = value
    return merged
