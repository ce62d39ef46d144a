"""Which model this router serves: its reference model card and the tokenizer that goes with it.

Told the model (``--model``), the router builds its reference card from the files, with the workers'
own code, and checks every worker's card against it. Not told, it adopts the card of the first worker
that reports one: it loads the tokenizer from the card's source (a preset, or a directory it can read)
and adopts only if the files it read have the card's tokenizer and chat-template fingerprints. Until a
card is adopted, or if it cannot be, requests get 503 — never tokenized with a default tokenizer.

Contract: runs on the router's event loop (the pool's health watch calls ``check``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract.model_card import ModelCard, ModelCardError, card_mismatch, checkpoint_shards, mismatched_fields
from engine.errors import ModelLoadError
from engine.presets import (
    GGUF_PRESETS,
    PRESETS,
    build_model_card,
    load_model_tokenizer,
    model_directory,
    model_weights_fingerprint,
    resolve_model_config,
)
from engine.thinking import ThinkTags
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.orchestrator import GenerationError
from router.workers import SOURCE_UNREADABLE, Incompatible, with_reasons

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients call it
    card: ModelCard  # the reference every worker is checked against, complete
    tokenizer: Tokenizer
    max_model_len: int  # what the router admits: the card's, or lower if the router was told so
    think_tags: ThinkTags | None = None  # with a reasoning parser: where the thinking starts and ends
    # When this router began serving it (Unix seconds): /v1/models' ``created``.
    since: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def block_size(self) -> int:
        return self.card.block_size

    @property
    def vocab_size(self) -> int:
        return self.card.vocab_size


class ModelBinding:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._reference: ModelCard | None = None
        self._tokenizer: Tokenizer | None = None
        self._refused: dict[tuple, str] = {}  # adoption attempts that failed, by card contents
        self.refusal: str | None = None  # why the router cannot serve, when it cannot adopt
        self._served: ServedModel | None = None  # made once per reference: every request asks for it
        # The workers not routed to, with why (WorkerPool.unavailable over both roles): named when no card came.
        self.workers_down: Callable[[], list[str]] = list
        if config.model is not None:
            self._reference, self._tokenizer = _reference_from_files(config)
            _think_tags(config, self._tokenizer)  # ValueError at start: the parser cannot read this model

    @property
    def served(self) -> ServedModel | None:
        """The model being served, once its reference card is complete (dtype and block size pinned)."""
        reference = self._reference
        if reference is None or reference.block_size is None or reference.dtype is None:
            return None
        if self._served is None or self._served.card is not reference or self._served.tokenizer is not self._tokenizer:
            name = self.config.served_model_name or reference.served_model_name
            tags = _think_tags(self.config, self._tokenizer)
            self._served = ServedModel(name, reference, self._tokenizer, reference.max_model_len, tags)
        return self._served

    def require(self) -> ServedModel:
        """The served model, or GenerationError(503) saying why there is none yet."""
        served = self.served
        if served is not None:
            return served
        if self.refusal is not None:
            raise GenerationError(self.refusal, 503)
        message = (
            "no worker has reported a compatible model card yet, so the router does not know the model to serve; "
            "retry shortly"
        )
        raise GenerationError(with_reasons(message, self.workers_down()), 503)

    def check(self, card: ModelCard | None) -> Incompatible | None:
        """None if a worker advertising ``card`` may be routed to, else why not. Adopts the first card
        when the router was not told the model; pins the reference's unknown fields from the first
        worker that matches the rest."""
        if self._reference is None and card is not None:
            self._adopt(card)
        if self._reference is None:
            reason = self.refusal or "the worker advertises no model card"
            return Incompatible(reason, (SOURCE_UNREADABLE,) if self.refusal else ("model_card",))
        reason = card_mismatch(self._reference, card)
        if reason is not None:
            return Incompatible(reason, mismatched_fields(self._reference, card))
        pinned = self._reference.pinned_by(card)
        if pinned != self._reference:
            log.info("model card pinned by a worker: dtype %s, block size %d", pinned.dtype, pinned.block_size)
            self._reference = pinned
        return None

    def describe(self) -> dict:
        """For status pages: what is served, and from where."""
        served = self.served
        reference = self._reference
        return {
            "name": served.name if served else None,
            "source": reference.source if reference else None,
            "adopted": self.config.model is None,
            "block_size": reference.block_size if reference else None,
            "max_model_len": served.max_model_len if served else None,
            "refusal": self.refusal,
        }

    def _adopt(self, card: ModelCard) -> None:
        key = (card.source, card.tokenizer_fingerprint, card.chat_template_fingerprint, card.vocab_size)
        if key in self._refused:
            return
        try:
            tokenizer = _tokenizer_matching(card)
        except ModelLoadError as exc:
            self.refusal = self._refused[key] = (
                f"the workers serve {card.source!r}, whose tokenizer this router cannot use: {exc}. "
                "Start the router with --model naming the same model (a preset, or a directory with its "
                "config and tokenizer files)"
            )
            log.error("cannot adopt the workers' model card: %s", self.refusal)
            return
        try:
            _think_tags(self.config, tokenizer)
        except ValueError as exc:
            self.refusal = self._refused[key] = f"the workers serve {card.source!r}: {exc}"
            log.error("cannot adopt the workers' model card: %s", self.refusal)
            return
        limit = _context_limit(self.config, card.max_model_len)
        self._reference, self._tokenizer, self.refusal = dataclasses.replace(card, max_model_len=limit), tokenizer, None
        log.info("adopted the workers' model card: %s from %s", card.served_model_name, card.source)


def _think_tags(config: RouterConfig, tokenizer: Tokenizer) -> ThinkTags | None:
    """The model's thinking tags where a reasoning parser reads them; ValueError when it has none."""
    return None if config.reasoning_parser == "none" else ThinkTags.of(tokenizer)


def _tokenizer_matching(card: ModelCard) -> Tokenizer:
    """The tokenizer at the card's source, if its files are the card's; ModelLoadError otherwise."""
    if card.source not in PRESETS and card.source not in GGUF_PRESETS and not Path(card.source).is_dir():
        raise ModelLoadError(f"{card.source!r} is neither a preset nor a directory on this machine")
    config = resolve_model_config(card.source)
    tokenizer = load_model_tokenizer(card.source, config)
    local = build_model_card(card.source, config, tokenizer, weights=None, max_model_len=card.max_model_len)
    differences = [
        label
        for name, label in (
            ("tokenizer_fingerprint", "tokenizer files"),
            ("chat_template_fingerprint", "chat template"),
            ("vocab_size", "vocab size"),
        )
        if getattr(local, name) != getattr(card, name)
    ]
    if differences:
        raise ModelLoadError(f"its {', '.join(differences)} on this machine differ from the workers'")
    return tokenizer


def _reference_from_files(config: RouterConfig) -> tuple[ModelCard, Tokenizer]:
    """The router's own card for ``--model``: weights are fingerprinted when the directory has them
    (else learned from the first matching worker); dtype and block size are always learned."""
    model_config = resolve_model_config(config.model)
    tokenizer = load_model_tokenizer(config.model, model_config)
    weights = None
    if config.model in PRESETS or _has_weights(model_directory(config.model)):
        weights = model_weights_fingerprint(config.model, model_config)
    limit = _context_limit(config, model_config.max_context)
    card = build_model_card(config.model, model_config, tokenizer, weights=weights, max_model_len=limit)
    # The workers name the model (the router's --served-model-name, if any, is what clients use): the first
    # worker's name is pinned, and the rest must share it.
    return dataclasses.replace(card, served_model_name=None), tokenizer


def _context_limit(config: RouterConfig, model_takes: int) -> int:
    """The tokens a request may hold: --max-model-len lowers what the model takes, never raises it (said once)."""
    if config.max_model_len and config.max_model_len > model_takes:
        log.warning(
            "--max-model-len %d is more than the model takes (%d tokens): serving %d",
            config.max_model_len,
            model_takes,
            model_takes,
        )
    return min(config.max_model_len or model_takes, model_takes)


def _has_weights(model_dir: Path) -> bool:
    try:
        return bool(checkpoint_shards(model_dir))
    except ModelCardError:
        return False
