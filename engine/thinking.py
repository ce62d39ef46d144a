"""A reasoning model's thinking: Qwen3's and DeepSeek-R1's output writes it between ``<think>`` and ``</think>``,
then its answer.

Whether the output starts inside the thinking is the prompt's to say: a prompt whose last tag is an open ``<think>``
(DeepSeek-R1's generation prompt, newer Qwen3 ones, or an assistant message continued inside it) starts there;
else the thinking is only what an output starting with ``<think>`` writes, up to ``</think>``. One block, at the
start: what follows ``</think>`` is the answer, tags and all.

The tags are the tokenizer's; the router splits the text by them (router/reasoning.py) and the sampler follows the
tokens (``Thoughts``): structured output holds the answer, not the thinking, and ``thinking_token_budget`` ends the
thinking after that many tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.tokenizer import Tokenizer

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ThinkTags:
    """The model's ``<think>`` and ``</think>`` tokens."""

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
    """One request's output: whether it starts inside the thinking, and the model's tags."""

    inside: bool
    tags: ThinkTags

    def tokens(self, output_ids: Sequence[int]) -> int:
        """How many of the output's tokens are its thinking (its closing tag, and an opening one, included)."""
        thoughts = Thoughts(self)
        return sum(not thoughts.record(token) for token in output_ids)


class Thoughts:
    """Where one request's output stands, token by token: at its start (where ``<think>`` may open the thinking),
    inside the thinking, or in the answer; and how many tokens it has thought (its tags not counted)."""

    def __init__(self, thinking: Thinking, budget: int | None = None) -> None:
        """``budget``: the most tokens the thinking may hold before its closing tag is the only one left."""
        self.tags = thinking.tags
        self.budget = budget
        self.at_start = not thinking.inside
        self.inside = thinking.inside
        self.thought = 0

    @property
    def forced(self) -> int | None:
        """The token this step must be (the closing tag, once the budget is spent), or None."""
        spent = self.inside and self.budget is not None and self.thought >= self.budget
        return self.tags.close_id if spent else None

    def record(self, token_id: int) -> bool:
        """Follows ``token_id``; whether it is the answer's (not the thinking's, nor one of its tags)."""
        if self.at_start:
            self.at_start = False
            if token_id == self.tags.open_id:
                self.inside = True
                return False
            return True
        if not self.inside:
            return True
        if token_id == self.tags.close_id:
            self.inside = False
        else:
            self.thought += 1
        return False
