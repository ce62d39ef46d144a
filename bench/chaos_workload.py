"""The traffic of ``splitserve bench chaos``: its prompt mix, one streamed request, and the exact-output oracle.

Every prompt is a long context of its own (so a replay that missed the decode worker's prefix cache goes
prefill → decode), or a chat, or text full of multi-byte characters, or a short prompt for the local path.
A request is judged against that prompt's reference answer, taken before any fault: the same text and,
where the server returns them (``logprobs`` + ``return_tokens_as_token_ids``), the same token ids.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import httpx

# Prompt kinds and their share of the pool. "short" stays below the router's local-prefill threshold.
KINDS = {"long": 0.45, "multibyte": 0.2, "chat": 0.25, "short": 0.1}
_WORDS = (
    "lease ticket block layer prefill decode router worker cache token stream migrate retry commit abort "
    "queue batch shard replica fault stall signal restart health drain quorum epoch ledger channel"
).split()
_MULTIBYTE = ("é", "ß", "ø", "ñ", "Ж", "λ", "日本", "語", "中文", "한국", "€", "→", "✓", "🙂", "🚀", "𝄞")
TOP_LOGPROBS = 2  # the runner-up of each token tells a numeric near-tie from a wrong answer


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    kind: str
    text: str  # the completion prompt, or the user message of a chat

    @property
    def chat(self) -> bool:
        return self.kind == "chat"


def build_prompts(count: int, prompt_len: int, seed: int) -> list[Prompt]:
    """``count`` prompts of about ``prompt_len`` bytes (the demo tokenizer's tokens), each opening with a
    header of its own so no two share a prefix-cache block."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    prompts = []
    for prompt_id in range(count):
        kind = rng.choices(kinds, weights=[KINDS[k] for k in kinds])[0]
        length = max(24, prompt_len // 6) if kind == "short" else prompt_len
        header = f"[chaos {seed}:{prompt_id} {rng.getrandbits(48):012x}] "
        prompts.append(Prompt(prompt_id, kind, header + _filler(rng, length - len(header), kind == "multibyte")))
    return prompts


def _filler(rng: random.Random, length: int, multibyte: bool) -> str:
    parts, size = [], 0
    while size < length:
        word = rng.choice(_MULTIBYTE) + rng.choice(_WORDS) if multibyte and rng.random() < 0.5 else rng.choice(_WORDS)
        parts.append(word)
        size += len(word.encode()) + 1
    return " ".join(parts)


def request_body(prompt: Prompt, model: str, max_tokens: int) -> tuple[str, dict]:
    """The endpoint and body of a greedy, streamed, fixed-length request that returns its token ids."""
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_tokens_as_token_ids": True,
    }
    if prompt.chat:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt.text}]
        return "/v1/chat/completions", {**body, "messages": messages, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
    return "/v1/completions", {**body, "prompt": prompt.text, "logprobs": TOP_LOGPROBS}


# -- one request ----------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What one streamed request returned, filled in as chunks arrive (so a hung request shows its progress)."""

    status: int = 0  # HTTP status; 0 before the headers came
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)  # per token: id -> logprob of the best few
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str = ""  # why it failed: "HTTP 503: ...", "stream error <code>: ...", "connection: ..."
    error_key: str = ""  # the error's class, for counting: "HTTP 503", "stream:service_unavailable", ...
    chunks: int = 0  # chunks that carried output
    done: bool = False  # "data: [DONE]" seen
    disconnected: bool = False  # we closed the connection on purpose
    token_ids_known: bool = True  # the server returned "token_id:N" for every token
    pieces: list[str] = field(default_factory=list)  # the text of each output chunk, in order
    first_byte_s: float | None = None
    retry_after_s: float | None = None  # a 429/503's Retry-After header: how long a client waits before its next try


async def stream(
    client: httpx.AsyncClient,
    base_url: str,
    prompt: Prompt,
    model: str,
    max_tokens: int,
    api_key: str | None,
    answer: Answer,
    disconnect_after: int | None = None,
) -> Answer:
    """Sends one request and reads its stream into ``answer``; with ``disconnect_after`` it closes the
    connection once that many output chunks have come. Never raises for a server-side failure."""
    endpoint, body = request_body(prompt, model, max_tokens)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.monotonic()
    try:
        async with client.stream("POST", base_url + endpoint, json=body, headers=headers) as response:
            answer.status = response.status_code
            answer.first_byte_s = time.monotonic() - started
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                answer.retry_after_s = _seconds(response.headers.get("retry-after"))
                answer.error, answer.error_key = f"HTTP {response.status_code}: {text[:300]}", f"HTTP {answer.status}"
                return answer
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    answer.done = True
                    break
                _take_chunk(json.loads(line[6:]), answer, prompt.chat)
                if answer.error:
                    return answer
                if disconnect_after is not None and answer.chunks >= disconnect_after and answer.finish_reason is None:
                    answer.disconnected = True
                    return answer  # leaving the block closes the connection mid-stream
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        answer.error, answer.error_key = f"connection: {type(exc).__name__}: {exc}", f"connection:{type(exc).__name__}"
        return answer
    if not answer.done and not answer.error:
        answer.error, answer.error_key = "the stream ended without [DONE]", "stream cut"
    return answer


def _seconds(header: str | None) -> float | None:
    """Retry-After as seconds (its delay-seconds form, the one the router sends); None when absent or a date."""
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None


def _take_chunk(chunk: dict, answer: Answer, chat: bool) -> None:
    if "error" in chunk:
        error = chunk["error"] or {}
        answer.error = f"stream error {error.get('code')}: {error.get('message')}"
        answer.error_key = f"stream:{error.get('code')}"
        return
    if chunk.get("usage"):
        answer.completion_tokens = chunk["usage"].get("completion_tokens")
    for choice in chunk.get("choices") or []:
        piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        tokens = _tokens_of(choice.get("logprobs"), chat)
        if piece or tokens:
            answer.chunks += 1
            answer.pieces.append(piece or "")
        answer.text += piece or ""
        for token_id, top in tokens:
            answer.token_ids_known &= token_id is not None
            answer.token_ids.append(token_id if token_id is not None else -1)
            answer.top.append(top)
        answer.finish_reason = choice.get("finish_reason") or answer.finish_reason


def _tokens_of(logprobs: dict | None, chat: bool) -> list[tuple[int | None, dict[int, float]]]:
    """(token id, {id: logprob} of the best few) per token of a chunk's logprobs."""
    if not logprobs:
        return []
    if chat:
        return [
            (_token_id(e["token"]), {_token_id(t["token"]): t["logprob"] for t in e.get("top_logprobs") or []})
            for e in logprobs.get("content") or []
        ]
    tops = logprobs.get("top_logprobs") or [{}] * len(logprobs.get("tokens") or [])
    return [
        (_token_id(token), {_token_id(k): v for k, v in (top or {}).items()})
        for token, top in zip(logprobs.get("tokens") or [], tops)
    ]


def _token_id(token: str) -> int | None:
    head, _, tail = token.partition("token_id:")
    return int(tail) if not head and tail.isdigit() else None


# -- the oracle -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    text: str
    token_ids: tuple[int, ...]
    top: tuple[dict[int, float], ...]
    finish_reason: str
    token_ids_known: bool
    pieces: tuple[str, ...] = ()

    @classmethod
    def of(cls, answer: Answer) -> Reference:
        return cls(
            answer.text,
            tuple(answer.token_ids),
            tuple(answer.top),
            answer.finish_reason or "",
            answer.token_ids_known,
            tuple(answer.pieces),
        )


def judge(answer: Answer, reference: Reference, tie_tolerance: float) -> tuple[str, dict]:
    """("ok" | "wrong" | "near_tie", evidence) for an answer the server said was complete.

    near_tie: the token ids part where the reference's best two tokens were within ``tie_tolerance`` in
    logprob, the only way greedy decoding may legitimately differ (float rounding in another batch)."""
    same_tokens = not (answer.token_ids_known and reference.token_ids_known) or (
        tuple(answer.token_ids) == reference.token_ids
    )
    if (
        answer.text == reference.text
        and same_tokens
        and answer.finish_reason == reference.finish_reason
        and answer.completion_tokens in (None, len(reference.token_ids))
    ):
        return "ok", {}
    evidence = difference(answer, reference)
    margin = evidence.get("reference_margin_at_token_diff")
    verdict = "near_tie" if margin is not None and margin <= tie_tolerance else "wrong"
    return verdict, evidence


def difference(answer: Answer, reference: Reference) -> dict:
    """Where and how an answer departs from its reference: enough to tell lost text from wrong tokens."""
    first_char = _first_difference(answer.text, reference.text)
    evidence = {
        "finish_reason": [answer.finish_reason, reference.finish_reason],
        "completion_tokens": [answer.completion_tokens, len(reference.token_ids)],
        "chars": [len(answer.text), len(reference.text)],
        "first_char_diff": first_char,
        "text_around_diff": [_around(answer.text, first_char), _around(reference.text, first_char)],
        "replacement_chars": [answer.text.count("\ufffd"), reference.text.count("\ufffd")],
        "token_ids_compared": answer.token_ids_known and reference.token_ids_known,
    }
    # Chunk by chunk (one token each, on this server): where text went missing or changed, e.g. a migration.
    chunk = _first_difference(answer.pieces, reference.pieces)
    if chunk is not None and answer.pieces and reference.pieces:
        evidence["first_chunk_diff"] = chunk
        evidence["chunks_around_diff"] = [answer.pieces[chunk : chunk + 3], list(reference.pieces[chunk : chunk + 3])]
    if evidence["token_ids_compared"]:
        token = _first_difference(answer.token_ids, reference.token_ids)
        evidence["token_ids_match"] = token is None
        evidence["first_token_diff"] = token
        if token is not None:
            evidence["tokens_around_diff"] = [
                answer.token_ids[token : token + 4],
                list(reference.token_ids[token : token + 4]),
            ]
            if token < len(reference.top) and len(reference.top[token]) >= 2:
                best, second = sorted(reference.top[token].values(), reverse=True)[:2]
                evidence["reference_margin_at_token_diff"] = best - second
    return evidence


def _first_difference(a, b) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def _around(text: str, index: int | None, width: int = 12) -> str:
    if index is None:
        return ""
    return text[max(0, index - width) : index + width]
