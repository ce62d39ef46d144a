"""A reasoning model's thinking, split from its answer (``--reasoning-parser``): Qwen3's and DeepSeek-R1's output
writes it between ``<think>`` and ``</think>``, and a chat completion returns it as ``reasoning_content`` (the
message's, and each streamed delta's), beside ``content``, as vLLM's reasoning parsers and DeepSeek's API do.

Whether the output starts inside the thinking is the prompt's to say: a prompt whose last tag is an open ``<think>``
(DeepSeek-R1's generation prompt, newer Qwen3 ones, or an assistant message continued inside it) starts there;
else the thinking is only what an output starting with ``<think>`` writes, up to ``</think>``. One block, at the
start: what follows ``</think>`` is the answer, tags and all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.tokenizer import Tokenizer

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ThinkTags:
    """The served model's ``<think>`` and ``</think>`` tokens."""

    open_id: int
    close_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ThinkTags:
        """ValueError when either tag is not one token of the vocabulary that its output text writes."""
        ids = []
        for tag in (OPEN, CLOSE):
            encoded = tokenizer.encode(tag, add_special_tokens=False)
            if len(encoded) != 1 or tokenizer.decode(encoded, skip_special_tokens=True) != tag:
                raise ValueError(
                    f"the model's tokenizer has no {tag} token that its output text writes: its thinking cannot be "
                    "told from its answer (--reasoning-parser none serves it)"
                )
            ids.append(encoded[0])
        return cls(*ids)

    def after(self, prompt_ids: Sequence[int]) -> Thinking:
        """The thinking of an output after ``prompt_ids``: inside it from the start where the prompt's last tag is an
        open one."""
        for token in reversed(prompt_ids):
            if token in (self.open_id, self.close_id):
                return Thinking(token == self.open_id, self)
        return Thinking(False, self)


@dataclass(frozen=True)
class Thinking:
    """One request's output under a reasoning parser: whether it starts inside the thinking, and the model's tags."""

    inside: bool
    tags: ThinkTags

    def splitter(self) -> Splitter:
        return Splitter(self.inside)

    def tokens(self, output_ids: Sequence[int]) -> int:
        """How many of the output's tokens are its thinking (its closing tag, and an opening one, included)."""
        if not self.inside and (not output_ids or output_ids[0] != self.tags.open_id):
            return 0
        for index, token in enumerate(output_ids):
            if token == self.tags.close_id:
                return index + 1
        return len(output_ids)


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
    return ("", text) if thinking is None else thinking.splitter().split(text)


def pieces(splitter: Splitter | None, text: str, last: bool) -> tuple[str, str]:
    """The (thinking, answer) of a streamed piece of text (``last``: the output's last); all answer without one."""
    return ("", text) if splitter is None else splitter.feed(text, last)
