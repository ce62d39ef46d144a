"""--reasoning-parser: a reasoning model's thinking (<think>…</think>) comes back as a chat completion's
reasoning_content, apart from its content, whole and streamed, where the prompt says the output starts (inside the
thinking when the prompt's last tag opens it). The model: a random Qwen2 whose BPE tokenizer has <think> and
</think> tokens, and a template whose generation prompt opens the thinking when asked; a logit bias on </think>
makes it close the thinking partway. The oracle is the same request's text from a router without the parser."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

from router.config import RouterConfig
from router.reasoning import CLOSE, OPEN, Splitter
from router.served_model import ModelBinding
from tests.checkpoints import write_checkpoint
from tests.engine.test_tokenizer import write_model_dir
from tests.router.conftest import SERVED_MODEL, RouterThread, wait_for
from tests.workers.harness import start_workers, stop_workers

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if open_thinking %}<think>\n{% endif %}{% endif %}"
)
MODEL = "bpe-thinking"


# -- the splitter, piece by piece -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inside", "text", "thinking", "answer"),
    [
        (True, "a plan</think>\n\nthe answer", "a plan", "\n\nthe answer"),
        (True, "still thinking", "still thinking", ""),
        (False, "<think>a plan</think>answer", "a plan", "answer"),
        (False, "answer <think>not thinking</think>", "", "answer <think>not thinking</think>"),
        (False, "<thin", "", "<thin"),
        (True, "x</thi", "x</thi", ""),
        (False, "", "", ""),
    ],
)
def test_every_split_of_the_text_gives_the_whole_texts_parts(inside, text, thinking, answer):
    assert Splitter(inside).split(text) == (thinking, answer)
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            splitter = Splitter(inside)
            pieces = [splitter.feed(text[:cut]), splitter.feed(text[cut:second]), splitter.feed(text[second:])]
            pieces.append(splitter.end())
            assert ("".join(p[0] for p in pieces), "".join(p[1] for p in pieces)) == (thinking, answer), (cut, second)


def test_a_model_without_think_tokens_is_refused_by_name(checkpoint):
    config = RouterConfig(model=str(checkpoint.path), served_model_name=SERVED_MODEL, reasoning_parser="qwen3")
    with pytest.raises(ValueError, match="no <think> token"):
        ModelBinding(config)


def test_workers_serving_a_model_without_think_tokens_are_not_adopted(cluster):
    """Not told the model, the router adopts the workers': one whose tokenizer has no tags is refused, and /ready
    says why."""
    config = RouterConfig(
        port=0, grpc_port=0, decode_addresses=(cluster.decode.address,), reasoning_parser="deepseek_r1"
    )
    router = RouterThread(config, ready=False)
    try:
        wait_for(lambda: router.call(lambda: router.router.frontend.model.refusal), 10, "the card to be refused")
        ready = httpx.get(f"{router.http}/ready", timeout=10)
        assert ready.status_code == 503 and "no <think> token" in ready.json()["model"]["refusal"]
    finally:
        router.stop()


# -- through a router and a decode worker --------------------------------------------------------------


@dataclass
class Served:
    parsed: RouterThread
    raw: RouterThread
    close_id: int


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    model_dir = write_model_dir(tmp_path_factory.mktemp("thinking") / MODEL, chat_template=TEMPLATE)
    backend = BackendTokenizer.from_file(str(model_dir / "tokenizer.json"))
    backend.add_tokens([AddedToken(OPEN, special=False), AddedToken(CLOSE, special=False)])
    backend.save(str(model_dir / "tokenizer.json"))
    write_checkpoint(
        model_dir,
        "Qwen2ForCausalLM",
        seed=11,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        max_position_embeddings=2048,
    )
    (decode,) = start_workers(("decode", str(model_dir)))
    routers = []
    try:
        for parser in ("qwen3", "none"):
            config = RouterConfig(
                port=0, grpc_port=0, decode_addresses=(decode.address,), reasoning_parser=parser, health_interval_s=0.2
            )
            routers.append(RouterThread(config))
        yield Served(*routers, backend.token_to_id(CLOSE))
    finally:
        for router in routers:
            router.stop()
        stop_workers([decode])


def _chat(router: RouterThread, served: Served, open_thinking: bool, stream: bool = False, **extra):
    return router.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Think first: what is 2 + 2?"}],
        max_tokens=24,
        temperature=0,
        stream=stream,
        logit_bias={str(served.close_id): 4},  # enough that the model closes its thinking partway
        extra_body={"chat_template_kwargs": {"open_thinking": open_thinking}, **extra},
    )


def _streamed(chunks) -> tuple[str, str]:
    thinking, answer = [], []
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            thinking.append(delta.get("reasoning_content") or "")
            answer.append(delta.get("content") or "")
    return "".join(thinking), "".join(answer)


def test_thinking_opened_by_the_prompt_is_reasoning_content_up_to_its_close(served):
    raw = _chat(served.raw, served, open_thinking=True).choices[0].message
    assert raw.content.count(CLOSE) >= 1 and not raw.content.startswith(CLOSE), (
        f"the bias was meant to close the thinking partway: {raw.content!r}"
    )
    thinking, _, answer = raw.content.partition(CLOSE)
    parsed = _chat(served.parsed, served, open_thinking=True).choices[0].message
    assert (parsed.model_dump()["reasoning_content"], parsed.content) == (thinking, answer)
    assert _streamed(_chat(served.parsed, served, open_thinking=True, stream=True)) == (thinking, answer)


def test_without_thinking_opened_the_text_is_all_answer(served):
    raw = _chat(served.raw, served, open_thinking=False).choices[0].message
    assert not raw.content.startswith(OPEN) and CLOSE in raw.content  # a stray close is answer text too
    parsed = _chat(served.parsed, served, open_thinking=False).choices[0].message
    assert (parsed.model_dump()["reasoning_content"], parsed.content) == (None, raw.content)
    assert _streamed(_chat(served.parsed, served, open_thinking=False, stream=True)) == ("", raw.content)
    assert "reasoning_content" not in _chat(served.raw, served, open_thinking=False).choices[0].message.model_dump()
