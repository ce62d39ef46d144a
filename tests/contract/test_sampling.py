"""The sampling record: one set of limits, each error naming its field, and nothing valid that the wire cannot
carry (fuzzed with hypothesis against the real protobuf conversion)."""

from __future__ import annotations

import math
import struct
from dataclasses import fields, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.sampling import (
    FIELDS,
    MAX_BAD_WORDS,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    FieldError,
    SamplingParams,
    check_text,
    check_token_ids,
    check_vocabulary,
    wrap_seed,
)
from protos import common_pb2

INT64 = 1 << 63


def f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def test_record_and_proto_have_the_same_fields():
    assert set(FIELDS) == {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 1 << 32),
        ("max_tokens", 2.0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1e-46),  # positive, but the wire's float32 makes it 0 ("unset", so 1.0)
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1 << 31),
        ("min_p", 1.01),
        ("seed", INT64),
        ("seed", -INT64 - 1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e-50),
        ("repetition_penalty", 2.1),
        ("stop", ("",)),
        ("stop", ("s",) * (MAX_STOP_STRINGS + 1)),
        ("stop", ("ok", "lone \ud800 surrogate")),
        ("stop", (5,)),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", (1 << 32,)),
        ("stop_token_ids", 5),  # not a sequence: a FieldError, not a TypeError
        ("ignore_eos", 1),
        ("logprobs", -1),
        ("logprobs", MAX_TOP_LOGPROBS + 1),
        ("logit_bias", {5: 100.5}),
        ("logit_bias", {5: -101}),
        ("logit_bias", {5: math.nan}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {1 << 32: 1.0}),
        ("logit_bias", ((5, 1.0), (5, 2.0))),
        ("logit_bias", "5"),
        ("min_tokens", -1),
        ("min_tokens", 1 << 32),
        ("max_tokens_defaulted", 1),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_TOP_LOGPROBS + 1),
        ("skip_special_tokens", 0),
        ("include_stop_str_in_output", "yes"),
        ("allowed_token_ids", (-1,)),
        ("allowed_token_ids", (1 << 32,)),
        ("allowed_token_ids", (True,)),
        ("allowed_token_ids", 5),
        ("bad_words", "word"),  # a string is no list of words
        ("bad_words", ("",)),
        ("bad_words", (" ",)),
        ("bad_words", (5,)),
        ("bad_words", ("\ud800",)),
        ("bad_words", ("w",) * (MAX_BAD_WORDS + 1)),
        ("bad_words", ("w" * 1001,)),
        ("thinking", 1),
        ("thinking_token_budget", 5),  # without thinking: nothing to bound
        ("thinking_token_budget", -1),
        ("thinking_token_budget", 1 << 32),
    ],
)
def test_each_bad_value_names_its_field(field, value):
    with pytest.raises(FieldError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.field == field
    assert field in str(caught.value)


def test_edges_are_valid_and_round_trip():
    edges = SamplingParams(
        max_tokens=(1 << 32) - 1,
        temperature=2.0,
        top_p=1e-7,
        top_k=(1 << 31) - 1,
        min_p=1.0,
        seed=-INT64,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=2.0,
        stop=("é", "\U0001f600"),
        stop_token_ids=(0, (1 << 32) - 1),
        ignore_eos=True,
        logprobs=MAX_TOP_LOGPROBS,
        logit_bias={(1 << 32) - 1: 100.0, 0: -100.0, 7: 0.1},
        min_tokens=(1 << 32) - 1,
        prompt_logprobs=MAX_TOP_LOGPROBS,
        max_tokens_defaulted=True,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        allowed_token_ids=[0, (1 << 32) - 1],
        bad_words=["w"] * MAX_BAD_WORDS,
        thinking=True,
        thinking_token_budget=(1 << 32) - 1,
    )
    assert edges.allowed_token_ids == (0, (1 << 32) - 1), "a tuple, in the order given"
    assert edges.logit_bias == ((0, -100.0), (7, f32(0.1)), ((1 << 32) - 1, 100.0)), "sorted, as float32"
    again = SamplingParams.from_wire(common_pb2.SamplingParams.FromString(edges.to_wire().SerializeToString()))
    assert again == replace(edges, top_p=f32(1e-7))
    assert SamplingParams(top_k=-1).top_k == 0, "-1 is vLLM's spelling of off"
    assert SamplingParams(stop="x").stop == ("x",)


def test_from_wire_reads_proto3_zeros_as_unset():
    zero = common_pb2.SamplingParams()
    with pytest.raises(FieldError, match="max_tokens") as caught:
        SamplingParams.from_wire(zero)
    assert caught.value.field == "max_tokens"
    params = SamplingParams.from_wire(zero, default_max_tokens=16)
    # zero temperature is greedy; top_p etc. off; the default is marked one (the engine may lower it to its pool)
    assert params == SamplingParams(max_tokens=16, temperature=0.0, max_tokens_defaulted=True)
    assert (params.top_p, params.repetition_penalty, params.seed, params.logprobs) == (1.0, 1.0, None, None)
    assert (params.logit_bias, params.min_tokens, params.prompt_logprobs) == ((), 0, None)
    # skip_special_tokens is optional on the wire: unset is its default (true), not the proto3 zero
    assert params.skip_special_tokens and not params.include_stop_str_in_output and params.allowed_token_ids == ()
    assert not SamplingParams(max_tokens=3).to_wire().HasField("skip_special_tokens")
    for skip in (True, False):
        wire = common_pb2.SamplingParams(max_tokens=3, skip_special_tokens=skip)
        assert SamplingParams.from_wire(wire).skip_special_tokens is skip
    explicit = SamplingParams.from_wire(common_pb2.SamplingParams(max_tokens=3, seed=0, logprobs=0, prompt_logprobs=0))
    assert (explicit.seed, explicit.logprobs, explicit.prompt_logprobs) == (0, 0, 0)
    assert not explicit.max_tokens_defaulted
    marked = SamplingParams.from_wire(common_pb2.SamplingParams(max_tokens=3, max_tokens_defaulted=True))
    assert (marked.max_tokens, marked.max_tokens_defaulted) == (3, True), "carried unchanged (a migration)"


def test_min_tokens_may_not_exceed_max_tokens():
    """One check for every API that builds the record (HTTP, gRPC) and for the wire."""
    assert SamplingParams(max_tokens=5, min_tokens=5).min_tokens == 5
    with pytest.raises(FieldError, match=r"min_tokens \(50\) must not exceed max_tokens \(5\)") as caught:
        SamplingParams(max_tokens=5, min_tokens=50)
    assert caught.value.field == "min_tokens"
    with pytest.raises(FieldError) as caught:
        SamplingParams.from_wire(common_pb2.SamplingParams(max_tokens=5, min_tokens=50))
    assert caught.value.field == "min_tokens"


def test_vocabulary_and_text_helpers():
    check_token_ids([0, 319], 320, "prompt")
    check_vocabulary(SamplingParams(stop_token_ids=(319,), logit_bias={0: 1.0}, allowed_token_ids=(0, 319)), 320)
    for field, bad in [
        ("stop_token_ids", SamplingParams(stop_token_ids=(320,))),
        ("logit_bias", SamplingParams(logit_bias={320: 1})),
        ("allowed_token_ids", SamplingParams(allowed_token_ids=(5, 320))),
    ]:
        with pytest.raises(FieldError) as caught:
            check_vocabulary(bad, 320)
        assert caught.value.field == field
    for bad in ([320], [-1], [True]):
        with pytest.raises(FieldError, match=r"prompt must hold token ids in \[0, 320\)") as caught:
            check_token_ids(bad, 320, "prompt")
        assert caught.value.field == "prompt"
    # Past the wire's range, before any vocabulary is known: no range of the wire's is named as the model's.
    with pytest.raises(FieldError, match="^logit_bias must hold token ids of the model's vocabulary$"):
        SamplingParams(logit_bias={2**40: 1})
    assert check_text("fine ✓", "model") == "fine ✓"
    with pytest.raises(FieldError) as caught:
        check_text("bad \udfff", "model")
    assert caught.value.field == "model"
    assert wrap_seed(INT64 - 1 + 2) == -INT64 + 1
    assert wrap_seed(5) == 5


# -- the fuzz: whatever passes validation, the wire carries and gives back ------------------------------

_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3.0, 3.0),
    st.floats(0.0, 1e-30),
    st.sampled_from([0.0, 1.0, 2.0, -2.0, 1e-46, 1e-40, 2.0000001, 3.5e38]),
    st.integers(-(1 << 70), 1 << 70),
    st.integers(-3, 3),
)
_integers = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.integers(-3, 40),
    st.sampled_from([(1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, INT64 - 1, INT64, -INT64, -INT64 - 1]),
    st.booleans(),
    st.floats(-5, 5),
)
_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=6)  # includes lone surrogates
_VALUES = {
    "max_tokens": _integers,
    "temperature": _numbers,
    "top_p": _numbers,
    "top_k": _integers,
    "min_p": _numbers,
    "seed": st.one_of(st.none(), _integers),
    "presence_penalty": _numbers,
    "frequency_penalty": _numbers,
    "repetition_penalty": _numbers,
    "stop": st.lists(_text, max_size=18).map(tuple),
    "stop_token_ids": st.lists(_integers, max_size=4).map(tuple),
    "ignore_eos": st.one_of(st.booleans(), st.integers(0, 1)),
    "logprobs": st.one_of(st.none(), _integers),
    "logit_bias": st.dictionaries(_integers, _numbers, max_size=3),
    "min_tokens": _integers,
    "prompt_logprobs": st.one_of(st.none(), _integers),
    "max_tokens_defaulted": st.one_of(st.booleans(), st.integers(0, 1)),
    "skip_special_tokens": st.one_of(st.booleans(), st.integers(0, 1)),
    "include_stop_str_in_output": st.one_of(st.booleans(), st.integers(0, 1)),
    "allowed_token_ids": st.lists(_integers, max_size=4).map(tuple),
    "bad_words": st.lists(st.text(max_size=3), max_size=3).map(tuple),
    "thinking": st.one_of(st.booleans(), st.integers(0, 1)),
    "thinking_token_budget": st.one_of(st.none(), _integers),
}
_FLOATS = {f.name for f in fields(SamplingParams) if f.type == "float"}


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_VALUES))
def test_valid_means_the_wire_carries_it(values):
    try:
        params = SamplingParams(**values)
    except FieldError as exc:
        assert exc.field in values, f"{exc.field} was not even set"
        alone = {exc.field: values[exc.field]}
        if exc.field == "min_tokens" and "max_tokens" in values:  # checked against max_tokens: bad beside it
            alone["max_tokens"] = values["max_tokens"]
        if exc.field == "thinking_token_budget" and values.get("thinking") is True:  # bad alone only in range
            alone["thinking"] = True
        with pytest.raises(FieldError):  # the named field alone is bad
            SamplingParams(**alone)
        return
    wire = params.to_wire()  # never raises for a valid record (range, type, UTF-8)
    again = SamplingParams.from_wire(common_pb2.SamplingParams.FromString(wire.SerializeToString()))
    expected = replace(params, **{name: f32(getattr(params, name)) for name in _FLOATS})
    assert again == expected
    assert again.to_wire() == wire
