"""A reasoning model's output in the engine (``SamplingParams.thinking``): structured output holds its answer, not
its thinking; ``thinking_token_budget`` closes the thinking after that many tokens; and a request resumed elsewhere (a
migration) goes on where it was, in its thinking or its answer. The model: a random Qwen2 whose BPE tokenizer has
<think> and </think>, made to close its thinking partway; the oracle is transformers' greedy output, the grammar's
mask applied by hand from the answer's first token."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from contract import grammar as specs
from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.grammar import GrammarCompiler
from engine.thinking import CLOSE, OPEN
from tests.checkpoints import close_thinking_at, hf_greedy, write_thinking_model
from tests.gpu.test_gpu import sample_every_field

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
ASKED = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
CLOSES_AT = 4  # the output position where the model closes a thinking the prompt opened
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["n"],
    "additionalProperties": False,
}
LIMIT = 40


class Thinker:
    def __init__(self, directory) -> None:
        self.model = write_thinking_model(directory, TEMPLATE)
        self.engine = Engine(EngineConfig(model=str(directory), dtype="float32", num_kv_blocks=128))
        tokenizer = self.engine.tokenizer
        self.open, self.close = (tokenizer.encode(tag, add_special_tokens=False)[0] for tag in (OPEN, CLOSE))
        self.asked = tokenizer.encode(ASKED, add_special_tokens=False)
        self.inside = [*self.asked, self.open]  # the prompt opens the thinking
        close_thinking_at(self.model, directory, self.inside, CLOSES_AT, self.close)
        self.engine = Engine(EngineConfig(model=str(directory), dtype="float32", num_kv_blocks=128))  # those weights
        self.second = Engine(EngineConfig(model=str(directory), dtype="float32", num_kv_blocks=128))
        self.grammars = GrammarCompiler(tokenizer, self.engine.model_config.vocab_size, tokenizer.eos_token_ids)
        self.eos = set(tokenizer.eos_token_ids)

    def generate(self, prompt: list[int], **fields) -> list[int]:
        params = SamplingParams(**{"max_tokens": LIMIT, "temperature": 0.0, **fields})
        (result,) = self.engine.generate([prompt], params)
        return list(result.token_ids)

    def constrained(self, ids: list[int], grammar: specs.Grammar, limit: int) -> list[int]:
        """transformers' greedy tokens after ``ids`` with the grammar's mask from the first: until the grammar is
        complete, EOS or ``limit``."""
        matcher, out = self.grammars.matcher(grammar, ids), []
        while len(out) < limit and not matcher.terminated:
            with torch.no_grad():
                logits = self.model(torch.tensor([ids + out])).logits[0, -1]
            allowed = matcher.allowed()
            token = int(logits[: allowed.numel()].masked_fill(~allowed[: logits.numel()], -torch.inf).argmax())
            out.append(token)
            if token in self.eos:
                break
            matcher.accept(token)
        return out


@pytest.fixture(scope="module")
def thinker(tmp_path_factory) -> Thinker:
    return Thinker(tmp_path_factory.mktemp("thinker") / "model")


def _grammar() -> specs.Grammar:
    return specs.json_schema(SCHEMA, "response_format")


def _answer(thinker: Thinker, tokens: list[int]) -> dict:
    text = thinker.engine.tokenizer.decode([t for t in tokens if t not in thinker.eos])
    answer = json.loads(text)
    jsonschema.validate(answer, SCHEMA)
    return answer


def test_the_grammar_holds_the_answer_after_the_thinking_the_prompt_opened(thinker):
    free = hf_greedy(thinker.model, thinker.inside, CLOSES_AT + 1)
    assert free[CLOSES_AT] == thinker.close and thinker.close not in free[:CLOSES_AT], "the model closes partway"
    thinking = free[: CLOSES_AT + 1]
    answer = thinker.constrained(thinker.inside + thinking, _grammar(), LIMIT - len(thinking))
    output = thinker.generate(thinker.inside, grammar=_grammar(), thinking=True)
    assert output == thinking + answer
    _answer(thinker, answer)
    # Without thinking the grammar holds the output from its first token: no thinking, and not the same tokens.
    plain = thinker.generate(thinker.inside, grammar=_grammar())
    assert plain == thinker.constrained(thinker.inside, _grammar(), LIMIT) and thinker.close not in plain
    _answer(thinker, plain)


def test_at_the_outputs_start_the_grammar_also_lets_it_open_its_thinking_and_a_budget_closes_it(thinker):
    """A bias makes <think> the likeliest token everywhere: the output opens its thinking, thinks <think> until its
    budget is spent, is closed there, and answers as the grammar says (which has no <think> in it)."""
    bias = {thinker.open: 100.0}
    output = thinker.generate(
        thinker.asked, grammar=_grammar(), thinking=True, thinking_token_budget=3, logit_bias=bias
    )
    thinking = [thinker.open] * 4 + [thinker.close]
    assert output[: len(thinking)] == thinking
    assert output[len(thinking) :] == thinker.constrained(thinker.asked + thinking, _grammar(), LIMIT - len(thinking))
    _answer(thinker, output[len(thinking) :])
    # Not thinking, the grammar never allows the <think> that the bias favours.
    plain = thinker.generate(thinker.asked, grammar=_grammar(), logit_bias=bias)
    assert thinker.open not in plain
    _answer(thinker, plain)


@pytest.mark.parametrize("budget", [0, 2])
def test_a_thinking_token_budget_closes_the_thinking_and_the_answer_follows_it(thinker, budget):
    output = thinker.generate(thinker.inside, thinking=True, thinking_token_budget=budget, max_tokens=12)
    thought = hf_greedy(thinker.model, thinker.inside, budget) if budget else []
    assert output[: budget + 1] == [*thought, thinker.close]
    rest = hf_greedy(thinker.model, thinker.inside + output[: budget + 1], 12 - budget - 1)
    assert output[budget + 1 :] == rest[: len(output) - budget - 1]
    # A budget the thinking does not reach changes nothing.
    assert thinker.generate(thinker.inside, thinking=True, thinking_token_budget=CLOSES_AT) == thinker.generate(
        thinker.inside, thinking=True
    )


@pytest.mark.parametrize("cut", [2, CLOSES_AT, CLOSES_AT + 1, CLOSES_AT + 3])
def test_a_request_resumed_elsewhere_goes_on_in_its_thinking_or_its_answer(thinker, cut):
    """Resumed inside the thinking, at its close, just past it, or inside the answer: the budget and the grammar
    count what came before, so the output is the one that never moved."""
    params = SamplingParams(
        max_tokens=LIMIT, temperature=0.0, grammar=_grammar(), thinking=True, thinking_token_budget=3
    )
    (whole,) = thinker.engine.generate([thinker.inside], params)
    whole = list(whole.token_ids)
    assert whole[3] == thinker.close and len(whole) > cut
    thinker.second.add_request("moved", thinker.inside, params, resume_token_ids=whole[:cut])
    rest: list[int] = []
    while thinker.second.has_unfinished():
        for output in thinker.second.step():
            rest.extend(output.token_ids)
    assert whole[:cut] + rest == whole


def test_what_cannot_think_is_refused(thinker, tmp_path):
    demo = Engine(EngineConfig(model="demo", dtype="float32", num_kv_blocks=16))
    with pytest.raises(InvalidRequestError, match="thinking: .*no <think> token"):
        demo.add_request("r", [1, 5, 6], SamplingParams(thinking=True))
    # A grammar whose first token is <think> (by its id: llguidance reads added tokens as special ones)
    anything = specs.Grammar("grammar", f"start: <[{thinker.open}]> /(?s:.*)/", accepted_prompt_tokens=1)
    with pytest.raises(InvalidRequestError, match="accepted_prompt_tokens hold thinking"):
        thinker.engine.add_request("r", thinker.inside, SamplingParams(grammar=anything, thinking=True))
    allowed = SamplingParams(thinking=True, thinking_token_budget=1, allowed_token_ids=(thinker.open, 5))
    with pytest.raises(InvalidRequestError, match="not in allowed_token_ids"):
        thinker.engine.add_request("r", thinker.inside, allowed)
    assert not thinker.engine.has_unfinished()


def test_the_gpu_tests_sampling_run_holds_on_the_cpu():
    """tests/gpu's run of every sampling field (a reasoning model's row among them) on CPU logits: what the GPU test
    asserts holds here, so that a GPU run tests the device, not the helper."""
    got = sample_every_field("cpu")
    assert got["thinking_closed_at"] is not None and got["thinking_closed_at"] <= 3 and got["thinking_terminated"]
    assert isinstance(json.loads(got["thinking_answer"])["n"], int)
    assert got["grammar_terminated"] and got["seeded_repeats"] and got["greedy_repeats"]
