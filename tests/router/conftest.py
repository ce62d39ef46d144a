"""The router in this process (its own event loop in a background thread), the workers as real processes.

One transformers-written checkpoint serves every router test: 8 layers, small enough that
transformers is a quick oracle, slow enough (a few ms per decode step) that a 1,900-token stream
lasts seconds — long enough for kills and disconnects to land mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer as BackendTokenizer

from bench.processes import free_port  # noqa: F401  (the tests import it from here)
from router.config import RouterConfig
from router.server import Router, new_event_loop
from tests.checkpoints import write_checkpoint
from tests.engine.test_tokenizer import write_model_dir
from tests.workers.harness import WorkerProcess, start_workers, stop_process, stop_workers

SERVED_MODEL = "tiny-llama"
VOCAB = 320
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
MAX_MODEL_LEN = 2048
EOS = 2
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model: object  # the transformers model the checkpoint was written from (the oracle)


@dataclass
class Cluster:
    prefills: list[WorkerProcess]
    decode: WorkerProcess

    @property
    def workers(self) -> list[WorkerProcess]:
        return [*self.prefills, self.decode]


class RouterThread:
    """A Router on its own event loop in a daemon thread; HTTP and gRPC on ports the OS picked."""

    def __init__(self, config: RouterConfig, ready: bool = True) -> None:
        self.loop = new_event_loop()  # the router process's own kind of loop
        self.thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self.thread.start()
        self.router: Router = self.call(lambda: Router(config))
        self.run(self.router.start(), 30)
        if ready:
            assert self.run(self.router.wait_ready(30), 35), "router saw no healthy decode worker"

    def run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, fn: Callable, timeout: float = 10.0):
        """Runs ``fn`` on the router's loop (the router's state belongs to that thread)."""

        async def wrapper():
            return fn()

        return self.run(wrapper(), timeout)

    @property
    def http(self) -> str:
        return self.router.urls["http"]

    @property
    def grpc(self) -> str:
        return self.router.urls["grpc"]

    def openai(self, api_key: str = "unused", timeout: float = REQUEST_TIMEOUT_S) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}/v1", api_key=api_key, timeout=timeout, max_retries=0)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, keyed by (name, sorted label items)."""
        text = httpx.get(f"{self.http}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def decisions(self) -> dict[str, float]:
        return {
            dict(labels)["decision"]: value
            for (name, labels), value in self.metrics().items()
            if name == "splitserve_routing_decisions_total"
        }

    def worker_active(self) -> dict[str, int]:
        """Requests this router has in flight per worker address."""
        return self.call(lambda: {address: w.active for address, w in self.router.pool.workers.items()})

    def running(self) -> int:
        return self.call(lambda: self.router.frontend.admission.running)

    def wait_synced(self, address: str, block_hashes: list[int], timeout: float = 10.0) -> None:
        """Until the router's KV index of ``address`` holds every one of ``block_hashes``."""
        pool = self.router.pool
        wait_for(
            lambda: self.call(lambda: pool.workers[address].kv.prefix_blocks(block_hashes)) == len(block_hashes),
            timeout,
            f"router to learn {address}'s cached blocks",
        )

    def stop(self) -> None:
        """Stops the router, then its loop (once: a test may stop a router that make_router stops after it)."""
        if not self.thread.is_alive():
            return
        try:
            self.run(self.router.stop(), 15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def metric_sum(samples: dict[tuple[str, tuple], float], name: str, **labels) -> float:
    """The sum of ``name``'s samples (as ``RouterThread.metrics`` keys them) whose labels include ``labels``."""
    return sum(
        v
        for (n, labelled), v in samples.items()
        if n == name and all(dict(labelled).get(k) == w for k, w in labels.items())
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def greedy_ignoring_eos(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation that, like ``ignore_eos``, runs on past EOS."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        while len(tokens) < max_new_tokens:
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def token_ids(logprobs_tokens: list[str]) -> list[int]:
    """Ids from logprob tokens rendered with ``return_tokens_as_token_ids``."""
    assert all(t.startswith("token_id:") for t in logprobs_tokens), logprobs_tokens[:3]
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


def complete_ids(router: RouterThread, prompt: list[int], max_tokens: int) -> list[int]:
    """The ids of a greedy completion of ``prompt`` through ``router`` that, like ``greedy_ignoring_eos``, runs on
    past EOS."""
    choice = (
        router.openai()
        .completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=max_tokens,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        .choices[0]
    )
    return token_ids(choice.logprobs.tokens)


@dataclass
class TemplatedModel:
    model_dir: Path
    model: object  # the transformers model the worker serves, fp32
    router: RouterThread

    @functools.cached_property
    def oracle(self):
        """transformers' tokenizer of the same directory: the oracle of what the chat template renders."""
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(self.model_dir))

    def oracle_ids(self, messages: list[dict], **kwargs) -> list[int]:
        """The prompt transformers renders and tokenizes from ``messages`` (``kwargs``: apply_chat_template's)."""
        ids = self.oracle.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)


@contextlib.contextmanager
def templated_model(model_dir: Path, chat_template: str, seed: int) -> Iterator[TemplatedModel]:
    """A random Qwen2 with a trained BPE tokenizer and ``chat_template``, written to ``model_dir``, served by one
    decode worker behind a router in this process (for tests of what a chat template makes of a request)."""
    write_model_dir(model_dir, chat_template=chat_template)
    vocab = BackendTokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    model = write_checkpoint(model_dir, "Qwen2ForCausalLM", seed=seed, vocab_size=vocab, max_position_embeddings=2048)
    (decode,) = start_workers(("decode", str(model_dir)))
    try:
        config = RouterConfig(
            port=0, grpc_port=0, decode_addresses=(decode.address,), health_interval_s=0.2, request_timeout_s=60.0
        )
        router = RouterThread(config)
        try:
            yield TemplatedModel(model_dir, model, router)
        finally:
            router.stop()
    finally:
        stop_workers([decode])


# -- fixtures ---------------------------------------------------------------------------------------


class RouterProcess:
    """A `splitserve router` process (``python -m cluster.cli router ARGS``), its output read as it comes: a pipe left
    unread fills up and blocks the router's logging, and with it the router. ``http`` is its OpenAI API's URL, from
    the line it prints once its workers are ready."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 60) -> None:
        command = [sys.executable, "-m", "cluster.cli", "router", *args]
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        self.lines: list[str] = []
        self._ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.http = self.wait_for(r"OpenAI API at (http://\S+)/v1", timeout).group(1)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
        self._ended.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching ``pattern``, waiting for it as long as the router runs."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            assert not self._ended.is_set(), f"the router ended without printing {pattern!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"the router did not print {pattern!r} in {timeout} s:\n{self.output}"
            time.sleep(0.05)

    def signal(self, number: int = signal.SIGTERM) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float) -> int:
        """Its exit status, once it has exited and its output is all read."""
        status = self.process.wait(timeout)
        self._ended.wait(10)
        return status

    def stop(self) -> str:
        """Stops it (SIGTERM, then SIGKILL after 15 s) if it still runs; its whole output."""
        stop_process(self.process, 15)
        self._ended.wait(10)
        return self.output


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Checkpoint:
    path = tmp_path_factory.mktemp("router-checkpoint") / "llama"
    model = write_checkpoint(path, "LlamaForCausalLM", seed=21, **MODEL_SHAPE)
    return Checkpoint(path, model)


@pytest.fixture(scope="session")
def cluster(checkpoint: Checkpoint) -> Iterator[Cluster]:
    """Two prefill workers and one decode worker, shared by every test that kills nothing."""
    model = str(checkpoint.path)
    p1, p2, d1 = start_workers(("prefill", model), ("prefill", model), ("decode", model))
    cluster = Cluster([p1, p2], d1)
    yield cluster
    stop_workers(cluster.workers)


def router_config(checkpoint: Checkpoint, prefills, decodes, **overrides) -> RouterConfig:
    settings = dict(
        model=str(checkpoint.path),
        served_model_name=SERVED_MODEL,
        port=0,
        grpc_port=0,
        prefill_addresses=tuple(w if isinstance(w, str) else w.address for w in prefills),
        decode_addresses=tuple(w if isinstance(w, str) else w.address for w in decodes),
        health_interval_s=0.2,
        request_timeout_s=REQUEST_TIMEOUT_S,
        shutdown_grace_s=2.0,  # a test may end with a request still in flight (a stalled worker's): cut it soon
    )
    settings.update(overrides)
    return RouterConfig(**settings)


@pytest.fixture
def make_router(checkpoint: Checkpoint) -> Iterator[Callable[..., RouterThread]]:
    """Routers made by a test, stopped after it: make_router(prefills, decodes, ready=True, **config)."""
    routers: list[RouterThread] = []

    def make(prefills, decodes, ready: bool = True, **overrides) -> RouterThread:
        router = RouterThread(router_config(checkpoint, prefills, decodes, **overrides), ready)
        routers.append(router)
        return router

    yield make
    for router in routers:
        router.stop()


@pytest.fixture(scope="session")
def router(checkpoint: Checkpoint, cluster: Cluster) -> Iterator[RouterThread]:
    """The shared router over the shared cluster: prompts of 32+ uncached tokens are prefilled remotely."""
    router = RouterThread(router_config(checkpoint, cluster.prefills, [cluster.decode], local_prefill_threshold=32))
    yield router
    router.stop()


@pytest.fixture
def rng(request) -> random.Random:
    """Prompts unique to each test, so prefix caches never leak between tests."""
    return random.Random(request.node.nodeid)


@dataclass
class Stream:
    """One streamed completion read by a client thread; progress is visible while it runs."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    leave: threading.Event = field(default_factory=threading.Event)  # set: the client leaves at its next chunk


def stream_greedy(client: openai.OpenAI, prompt: list[int], max_tokens: int, stream: Stream, **extra) -> None:
    """Reads a greedy streamed completion of ``prompt`` into ``stream`` (``extra``: more request fields)."""
    try:
        with client.completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=max_tokens,
            temperature=0,
            logprobs=0,
            stream=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **extra.pop("extra_body", {})},
            **extra,
        ) as chunks:
            for chunk in chunks:
                for choice in chunk.choices:
                    stream.ids.extend(token_ids(choice.logprobs.tokens) if choice.logprobs else [])
                    stream.text += choice.text
                    stream.finish_reason = choice.finish_reason or stream.finish_reason
                if stream.leave.is_set():
                    break
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        stream.error = exc
    finally:
        stream.done.set()


def start_stream(client: openai.OpenAI, prompt: list[int], max_tokens: int, **extra) -> Stream:
    """``stream_greedy`` on a thread of its own; the Stream fills as it runs."""
    stream = Stream()
    threading.Thread(target=stream_greedy, args=(client, prompt, max_tokens, stream), kwargs=extra, daemon=True).start()
    return stream


def streams_under_way(client: openai.OpenAI, prompts: list[list[int]], max_tokens: int) -> list[Stream]:
    """A stream of each prompt, returned once every one has output (5 tokens) and none has finished: a fault made
    now lands mid-stream."""
    streams = [start_stream(client, p, max_tokens) for p in prompts]
    wait_for(
        lambda: all(len(s.ids) >= 5 for s in streams) or any(s.done.is_set() for s in streams),
        30,
        "every stream to start",
    )
    assert not any(s.done.is_set() for s in streams), [s.error for s in streams]
    return streams
