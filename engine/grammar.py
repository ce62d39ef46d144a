"""Structured output in the engine: grammar specs compiled with this model's tokenizer, and token masks.

A spec (contract/grammar.py) compiles once per worker and key into a pristine llguidance matcher; each request
gets a copy. The sampler masks the logits with the request's matcher; the request advances it with every token
it accepts — the one it sampled, or one sampled elsewhere (the prefill worker's first token, the tokens before
a migration) — so the matcher always stands where the sequence does::

    prompt ─┬─ P: fresh matcher ── mask ── token 1 ─────────────────────────────► (P is done)
            └─ D: fresh matcher ── accept token 1 ── mask ── token 2 ── accept ── mask ── ...

Engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from contract.errors import FieldError
from contract.grammar import Grammar
from engine.errors import InvalidRequestError
from engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

try:
    import llguidance
except ImportError:  # a base dependency; without it the router refuses structured output, and so does this
    llguidance = None

_CACHE_SIZE = 64
_BITS = torch.arange(32, dtype=torch.int32)


class GrammarMatcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, grammar_vocab_size: int) -> None:
        """``vocab_size``: the logits' width; ``grammar_vocab_size``: the ids the matcher knows (at least as many)."""
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bitmask = torch.empty(-(-grammar_vocab_size // 32), dtype=torch.int32)  # one bit per token id

    def accept(self, token_id: int) -> None:
        """Advances past ``token_id``; a token the grammar forbids leaves the matcher stopped (in error)."""
        self._matcher.consume_token(int(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete (or broken): no further token may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""

    def allowed(self) -> torch.Tensor:
        """[vocab_size] bool on the CPU: the tokens that may come next."""
        bitmask = self._bitmask
        self._matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())
        return ((bitmask[:, None] >> _BITS) & 1).bool().reshape(-1)[: self._vocab_size]


class GrammarCompiler:
    """Compiles specs for one model's tokenizer; the tokenizer's llguidance view is built on first use
    (it walks the whole vocabulary) and each spec once per key (least recently used evicted)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def matcher(self, grammar: Grammar, prompt_token_ids: Sequence[int]) -> GrammarMatcher:
        """A matcher at the start of the output, past the ``grammar.accepted_prompt_tokens`` last prompt tokens.
        InvalidRequestError if the grammar does not compile for this vocabulary or those tokens break it."""
        if llguidance is None:
            raise InvalidRequestError("structured output needs the llguidance package, which is not installed")
        pristine = self._compiled.get(grammar.key)
        if pristine is None:
            pristine = self._compile(grammar)
        self._compiled.move_to_end(grammar.key)
        matcher = GrammarMatcher(pristine.deep_copy(), self._vocab_size, self._llguidance_tokenizer().vocab_size)
        accepted = grammar.accepted_prompt_tokens
        if accepted:
            if accepted > len(prompt_token_ids):
                raise InvalidRequestError("grammar.accepted_prompt_tokens exceeds the prompt")
            for token_id in prompt_token_ids[-accepted:]:
                matcher.accept(token_id)
            if matcher.error:
                raise InvalidRequestError(f"the tokens so far do not follow the grammar: {matcher.error}")
        return matcher

    def _compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        try:
            compiled = grammar.compiled()
        except FieldError as exc:
            raise InvalidRequestError(str(exc)) from exc
        matcher = llguidance.LLMatcher(self._llguidance_tokenizer(), compiled, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {grammar.kind}: {matcher.get_error()}")
        self._compiled[grammar.key] = matcher
        while len(self._compiled) > _CACHE_SIZE:
            self._compiled.popitem(last=False)
        return matcher

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            if isinstance(self._tokenizer, HFTokenizer):
                source = self._tokenizer.to_json()
            elif isinstance(self._tokenizer, ByteTokenizer):
                source = llguidance.TokenizerWrapper(_ByteVocabulary(self._tokenizer))
            else:
                raise InvalidRequestError(f"structured output does not support {type(self._tokenizer).__name__}")
            vocab = max(self._vocab_size, self._tokenizer.vocab_size)
            self._ll_tokenizer = llguidance.LLTokenizer(source, n_vocab=vocab, eos_token=self._eos_token_ids)
        return self._ll_tokenizer


class _ByteVocabulary:
    """ByteTokenizer as llguidance reads a vocabulary: each id's bytes (special ones marked by a 0xFF prefix,
    llguidance's convention) and an encoder of bytes."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.EOS_ID
        self.bos_token_id = tokenizer.BOS_ID
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        self.tokens = [
            b"\xff" + tokenizer.token_bytes(i, skip_special_tokens=False)
            if tokenizer.is_special(i)
            else tokenizer.token_bytes(i)
            for i in range(tokenizer.vocab_size)
        ]

    def __call__(self, text: bytes) -> list[int]:
        return [self._tokenizer.FIRST_BYTE_ID + b for b in text]
