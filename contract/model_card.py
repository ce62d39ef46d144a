"""The model card: what a worker serves, as the router adopts it or checks it.

Built from primitives (file paths, config fields, template text) so that the worker, which has its
engine loaded, and the router, which has only files, compute every fingerprint with the same code.
The weights fingerprint is the one workers exchange as ``KVLayout.model_fingerprint``.

Which fields must agree between the router's reference card and a worker's, and why:

    protocol_version           the messages themselves differ
    weights_fingerprint        another model computes other tokens (a decode worker prefilling
                               locally would answer 200 with them)
    tokenizer_fingerprint      the router encodes prompts and decodes the first token
    chat_template_fingerprint  the router renders chats
    vocab_size                 the router checks prompt ids against it
    dtype                      other numerics, other tokens; KV of another dtype cannot cross
    block_size                 the router's prefix-cache keys, and KV blocks between workers
    max_model_len              the worker must take every prompt the router admits (>=, not ==)

Not compared: ``served_model_name`` (a label: the router's own name, when it was given one, wins) and
``source`` (a path means nothing on another machine; the fingerprints say whether contents agree).
A reference field left None (the router knows the model but not how the workers run it: dtype and
block size; or the weights, when its directory has none) is pinned by the first worker that matches
the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import xxhash

from protos import common_pb2
from protos.version import PROTOCOL_VERSION

# Files that make up a tokenizer, whichever of them a model directory has. ``tokenizer_config.json``
# counts without its ``chat_template``, which has its own fingerprint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


class ModelCardError(ValueError):
    """A model directory cannot be fingerprinted (missing or malformed files)."""


@dataclass(frozen=True)
class ModelCard:
    served_model_name: str | None  # None only on a router's reference card: learned from the workers
    source: str  # preset name or model directory (absolute path)
    weights_fingerprint: str | None  # None only on a reference made from a directory without weights
    tokenizer_fingerprint: str
    chat_template_fingerprint: str
    vocab_size: int
    max_model_len: int
    dtype: str | None = None  # None only on a router's reference card: learned from the workers
    block_size: int | None = None  # likewise
    protocol_version: int = PROTOCOL_VERSION

    def to_wire(self) -> common_pb2.ModelCard:
        return common_pb2.ModelCard(
            served_model_name=self.served_model_name,
            source=self.source,
            weights_fingerprint=self.weights_fingerprint or "",
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            chat_template_fingerprint=self.chat_template_fingerprint,
            dtype=self.dtype or "",
            block_size=self.block_size or 0,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            protocol_version=self.protocol_version,
        )

    @classmethod
    def from_wire(cls, message: common_pb2.ModelCard) -> ModelCard:
        return cls(
            served_model_name=message.served_model_name,
            source=message.source,
            weights_fingerprint=message.weights_fingerprint or None,
            tokenizer_fingerprint=message.tokenizer_fingerprint,
            chat_template_fingerprint=message.chat_template_fingerprint,
            vocab_size=message.vocab_size,
            max_model_len=message.max_model_len,
            dtype=message.dtype or None,
            block_size=message.block_size or None,
            protocol_version=message.protocol_version,
        )

    def pinned_by(self, worker: ModelCard) -> ModelCard:
        """This reference with its unknown fields (None) taken from ``worker``."""
        unknown = {f.name: getattr(worker, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is None}
        return dataclasses.replace(self, **unknown) if unknown else self


def card_of_stats(stats: common_pb2.WorkerStats) -> ModelCard | None:
    """The card a worker advertises in its stats, or None if it advertises none."""
    return ModelCard.from_wire(stats.model_card) if stats.HasField("model_card") else None


_MUST_MATCH = (
    ("protocol_version", "protocol version"),
    # The name clients use: a router told none serves the first worker's, which the rest must share.
    ("served_model_name", "served model name"),
    ("weights_fingerprint", "weights"),
    ("tokenizer_fingerprint", "tokenizer files"),
    ("chat_template_fingerprint", "chat template"),
    ("vocab_size", "vocab size"),
    ("dtype", "dtype"),
    ("block_size", "block size"),
)
MISMATCH_FIELDS = (*(name for name, _ in _MUST_MATCH), "max_model_len", "model_card")


def card_mismatch(reference: ModelCard, worker: ModelCard | None) -> str | None:
    """None if a worker with card ``worker`` may serve for ``reference``; else why not, naming every
    field that differs. Fields the reference leaves None are not checked."""
    differences = _differences(reference, worker)
    if not differences:
        return None
    if worker is None:
        return differences[0][1]
    return f"model card of {worker.source!r} disagrees with the router's: " + "; ".join(t for _, t in differences)


def mismatched_fields(reference: ModelCard, worker: ModelCard | None) -> tuple[str, ...]:
    """The fields ``card_mismatch`` names, from the bounded set ``MISMATCH_FIELDS`` (metric labels)."""
    return tuple(name for name, _ in _differences(reference, worker))


def _differences(reference: ModelCard, worker: ModelCard | None) -> list[tuple[str, str]]:
    if worker is None:
        return [("model_card", "the worker advertises no model card")]
    differences = [
        (name, f"{label}: router {getattr(reference, name)!r}, worker {getattr(worker, name)!r}")
        for name, label in _MUST_MATCH
        if getattr(reference, name) is not None and getattr(reference, name) != getattr(worker, name)
    ]
    if worker.max_model_len < reference.max_model_len:
        text = (
            f"max_model_len: router admits {reference.max_model_len} tokens, worker takes only {worker.max_model_len}"
        )
        differences.append(("max_model_len", text))
    return differences


# -- names --------------------------------------------------------------------------------------------


def check_served_model_name(name: str | None) -> None:
    """ValueError for a served model name set to nothing (--served-model-name ''): it was taken as unset, and the
    model served under its default name. None: unset."""
    if name is not None and not name.strip():
        raise ValueError("served_model_name (--served-model-name) must not be empty: leave it unset for the default")


def default_served_model_name(source: str) -> str:
    """A preset's name, or a model directory's basename: never a path unless the user passes one."""
    return PurePath(source.rstrip("/")).name or source


# -- fingerprints -------------------------------------------------------------------------------------


def content_hash(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """Every byte counts: checkpoints of the same shape with other weights must not pass a handshake."""
    digest = xxhash.xxh3_128()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_identity(shards: Sequence[Path]) -> str:
    """The weights of a checkpoint, from its safetensors shards (names and contents, in order)."""
    identity = hashlib.sha256()
    for shard in shards:
        identity.update(f"{shard.name}:{content_hash(shard)}".encode())
    return identity.hexdigest()


def preset_identity(name: str, seed: int) -> str:
    """The weights of a preset: seeded dummy weights are the same wherever they are drawn."""
    return f"preset:{name}:seed={seed}"


def weights_fingerprint(config_fields: dict, identity: str) -> str:
    """The model's fingerprint (``KVLayout.model_fingerprint``): its shape plus its weights' identity."""
    payload = json.dumps({"config": config_fields, "weights": identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def checkpoint_shards(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelCardError(f"malformed {index}: {exc}") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise ModelCardError(
            f"model directory {str(model_dir)!r} has no usable safetensors files {missing or ''}".rstrip()
        )
    return files


def tokenizer_fingerprint(model_dir: Path | None, vocab_size: int) -> str:
    """The tokenizer files of ``model_dir`` (None: a preset), with the vocab size. A directory without
    tokenizer files and a preset of the same vocab size both tokenize bytes, and so agree."""
    digest = hashlib.sha256(f"vocab={vocab_size}".encode())
    for name in TOKENIZER_FILES if model_dir is not None else ():
        path = model_dir / name
        if not path.is_file():
            continue
        digest.update(f"\0{name}\0".encode())
        digest.update(_tokenizer_config_bytes(path) if name == "tokenizer_config.json" else path.read_bytes())
    return digest.hexdigest()[:16]


def _tokenizer_config_bytes(path: Path) -> bytes:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"cannot read {path}: {exc}") from exc
    if isinstance(config, dict):
        config.pop("chat_template", None)
    return json.dumps(config, sort_keys=True).encode()


def chat_template_fingerprint(template: str) -> str:
    """The text of the chat template the tokenizer renders."""
    return hashlib.sha256(template.encode()).hexdigest()[:16]
