"""A reasoning model's thinking, split from its answer (``--reasoning-parser``): a chat completion returns it as
``reasoning_content`` (the message's, and each streamed delta's), beside ``content``, as vLLM's reasoning parsers and
DeepSeek's API do; a response as a reasoning item; a message as a thinking block. Where the thinking starts and ends
is engine/thinking.py's rule, which the sampler follows on the tokens and this module on the text.
"""

from __future__ import annotations

from engine.thinking import CLOSE, OPEN, Thinking

NOT_THINKING = "the served model's thinking is not told from its answer (the server runs --reasoning-parser none)"


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
