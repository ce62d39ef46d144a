import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.sampling import MAX_TEMPERATURE, SamplingParams
from engine.sampler import Sampler, SamplingState, _apply_penalties

VOCAB = 32


def make_state(prompt=(), **params) -> SamplingState:
    return SamplingState(SamplingParams(**params), prompt_token_ids=list(prompt))


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draw_many(logits_row: torch.Tensor, draws: int, seed: int = 123, **params) -> Counter:
    """Samples ``draws`` times from one row (as a batch of identical unseeded rows)."""
    sampler = Sampler(logits_row.numel(), seed=seed)
    states = [make_state(**params) for _ in range(draws)]
    result = sampler.sample(logits_row.expand(draws, -1).contiguous(), states)
    return Counter(result.token_ids)


def chi_square(counts: Counter, probs: torch.Tensor, draws: int) -> float:
    """Pearson statistic over tokens with non-negligible expected counts."""
    stat = 0.0
    for token, p in enumerate(probs.tolist()):
        expected = p * draws
        if expected >= 5:
            stat += (counts.get(token, 0) - expected) ** 2 / expected
    return stat


def run_steps(sampler: Sampler, logits_per_step: list[torch.Tensor], states: list[SamplingState]) -> list[list[int]]:
    """Runs a decode loop; returns each row's token sequence."""
    sequences: list[list[int]] = [[] for _ in states]
    for logits in logits_per_step:
        result = sampler.sample(logits, states)
        for state, seq, token in zip(states, sequences, result.token_ids):
            state.record(token)
            seq.append(token)
    return sequences


# ----- greedy ------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(8)
    result = Sampler(VOCAB).sample(logits, [make_state(temperature=0.0) for _ in range(8)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 8


def test_all_greedy_batch_takes_fast_path(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("fast path must not sort, softmax or draw noise")

    for name in ("sort", "softmax", "exponential_", "topk"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "sort", forbidden)
    monkeypatch.setattr(torch, "softmax", forbidden)

    logits = random_logits(512, vocab=1000)
    result = Sampler(1000).sample(logits, [make_state(temperature=0.0) for _ in range(512)])
    assert result.token_ids == logits.argmax(dim=-1).tolist()

    # The guard is live: one sampled row leaves the fast path.
    mixed = [make_state(temperature=0.0) for _ in range(3)] + [make_state(temperature=1.0)]
    with pytest.raises(AssertionError, match="fast path"):
        Sampler(1000).sample(logits[:4], mixed)


def test_padding_columns_beyond_vocab_are_ignored():
    logits = random_logits(4)
    padded = torch.cat([logits, torch.full((4, 5), 1e4)], dim=1)
    states = [make_state(temperature=0.0), make_state(temperature=1.0, seed=1)] * 2
    result = Sampler(VOCAB).sample(padded, states)
    assert all(t < VOCAB for t in result.token_ids)
    assert result.token_ids[0] == logits[0].argmax().item()


# ----- seeds -------------------------------------------------------------------------------------


def test_seeded_sampling_reproducible_across_calls():
    steps = [random_logits(1, seed=s) for s in range(20)]
    first = run_steps(Sampler(VOCAB, seed=1), steps, [make_state(seed=7)])
    second = run_steps(Sampler(VOCAB, seed=2), steps, [make_state(seed=7)])
    assert first == second


def test_resampling_a_step_without_recording_gives_same_token():
    sampler, state = Sampler(VOCAB), make_state(seed=3)
    logits = torch.zeros(1, VOCAB)
    assert len({sampler.sample(logits, [state]).token_ids[0] for _ in range(10)}) == 1


def test_seeded_row_independent_of_batch_composition_and_order():
    steps = [random_logits(6, seed=s) for s in range(15)]
    alone = run_steps(Sampler(VOCAB), [x[:1] for x in steps], [make_state(seed=42, top_k=10)])[0]

    def batch_with_target_at(position: int) -> list[int]:
        others = [
            make_state(),
            make_state(temperature=0.0),
            make_state(seed=5),
            make_state(top_p=0.5),
            make_state(seed=9),
        ]
        states = others[:position] + [make_state(seed=42, top_k=10)] + others[position:]
        order = list(range(1, 6))
        order.insert(position, 0)  # row 0 of each step's logits is the target's
        return run_steps(Sampler(VOCAB, seed=99), [x[order] for x in steps], states)[position]

    assert batch_with_target_at(0) == alone
    assert batch_with_target_at(3) == alone
    assert batch_with_target_at(5) == alone


def test_different_seeds_give_different_sequences():
    steps = [torch.zeros(1, 50)] * 10
    sequences = [tuple(run_steps(Sampler(50), steps, [make_state(seed=s)])[0]) for s in range(20)]
    assert len(set(sequences)) == 20


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(64, VOCAB)
    a = Sampler(VOCAB, seed=1).sample(logits, [make_state() for _ in range(64)]).token_ids
    b = Sampler(VOCAB, seed=1).sample(logits, [make_state() for _ in range(64)]).token_ids
    c = Sampler(VOCAB, seed=2).sample(logits, [make_state() for _ in range(64)]).token_ids
    assert a == b and a != c


# ----- temperature and filters --------------------------------------------------------------------

SKEWED = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0])


@pytest.mark.parametrize("temperature", [0.25, 1.0, MAX_TEMPERATURE])
def test_temperature_matches_scaled_softmax(temperature):
    draws = 20000
    counts = draw_many(SKEWED, draws, temperature=temperature)
    expected = torch.softmax(SKEWED / temperature, dim=-1)
    # df <= 7; 24.3 is the p = 0.001 critical value.
    assert chi_square(counts, expected, draws) < 24.3


def test_low_temperature_concentrates_and_high_spreads():
    draws = 20000
    low = draw_many(SKEWED, draws, temperature=0.1)
    high = draw_many(SKEWED, draws, temperature=MAX_TEMPERATURE)
    assert low[0] / draws > 0.99
    assert high[0] / draws < 0.35 and len(high) == len(SKEWED)  # p = 0.31 at T = 2, 0.52 at T = 1


def test_top_k_one_is_greedy():
    logits = random_logits(16)
    states = [make_state(temperature=1.5, top_k=1, seed=i) for i in range(16)]
    assert Sampler(VOCAB).sample(logits, states).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_samples_only_within_top_k_and_renormalises():
    row = random_logits(1, seed=4)[0] / 3  # flat enough that every top-k token shows up
    draws, k = 20000, 5
    counts = draw_many(row, draws, top_k=k)
    top = row.topk(k).indices
    assert set(counts) == set(top.tolist())
    expected = torch.full_like(row, -math.inf).scatter(0, top, row[top]).softmax(-1)
    assert chi_square(counts, expected, draws) < 20.5  # df 4, p = 0.001


def test_top_p_keeps_smallest_nucleus():
    row = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    draws = 20000
    assert set(draw_many(row, draws, top_p=0.65)) == {0, 1}  # 0.4 < 0.65 <= 0.7
    counts = draw_many(row, draws, top_p=0.75)
    assert set(counts) == {0, 1, 2}
    assert chi_square(counts, torch.tensor([4, 3, 2, 0]) / 9, draws) < 13.8  # df 2, p = 0.001
    assert set(draw_many(row, 200, top_p=0.3)) == {0}  # the top token always survives


def test_min_p_drops_tokens_below_fraction_of_max():
    row = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    counts = draw_many(row, 20000, min_p=0.25)  # threshold 0.125
    assert set(counts) == {0, 1, 2}
    assert set(draw_many(row, 2000, min_p=0.6)) == {0}


def test_min_p_uses_temperature_scaled_distribution():
    row = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    # At T = 0.5 probs become ∝ p², so token 2 (0.0225/0.25 = 0.09 of max) drops below 0.125.
    assert set(draw_many(row, 20000, temperature=0.5, min_p=0.125)) == {0, 1}


def reference_allowed(row: torch.Tensor, params: SamplingParams) -> set[int]:
    """Straight-line top-k → top-p → min-p on a single row, in float64."""
    scaled = row.double() / params.temperature
    order = scaled.argsort(descending=True).tolist()
    if params.top_k > 0:
        order = order[: params.top_k]
    probs = torch.softmax(scaled[order], dim=-1).tolist()
    kept, mass = [], 0.0
    for token, p in zip(order, probs):
        if mass >= params.top_p:
            break
        kept.append(token)
        mass += p
    max_prob = probs[0]
    return {t for t, p in zip(order, probs) if t in kept and p >= params.min_p * max_prob}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    logits_seed=st.integers(0, 10_000),
    temperature=st.floats(0.3, MAX_TEMPERATURE),
    top_k=st.integers(-1, 12),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.9),
)
def test_filters_never_sample_outside_reference_set(logits_seed, temperature, top_k, top_p, min_p):
    row = random_logits(1, vocab=16, seed=logits_seed)[0]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    allowed = reference_allowed(row, params)
    states = [SamplingState(params, []) for _ in range(300)]
    tokens = Sampler(16, seed=logits_seed).sample(row.expand(300, -1).contiguous(), states).token_ids
    assert set(tokens) <= allowed


# ----- penalties ---------------------------------------------------------------------------------


def greedy_token(logits_row: torch.Tensor, state: SamplingState) -> int:
    return Sampler(logits_row.numel()).sample(logits_row[None], [state]).token_ids[0]


def with_history(state: SamplingState, tokens) -> SamplingState:
    for t in tokens:
        state.record(t)
    return state


def test_presence_penalty_changes_choice_and_matches_formula():
    row = torch.tensor([1.0, 0.9, 0.0, -1.0])
    assert greedy_token(row, with_history(make_state(temperature=0.0), [0])) == 0
    state = with_history(make_state(temperature=0.0, presence_penalty=0.5), [0, 0, 3])
    assert greedy_token(row, state) == 1
    out = _apply_penalties(row[None], [state])[0]
    assert torch.allclose(out, torch.tensor([0.5, 0.9, 0.0, -1.5]))


def test_frequency_penalty_changes_choice_and_matches_formula():
    row = torch.tensor([1.0, 0.9, 0.0, -1.0])
    once = with_history(make_state(temperature=0.0, frequency_penalty=0.05), [0])
    assert greedy_token(row, once) == 0  # 1.0 - 0.05 still beats 0.9
    thrice = with_history(make_state(temperature=0.0, frequency_penalty=0.05), [0, 0, 0, 3])
    assert greedy_token(row, thrice) == 1  # 1.0 - 3 * 0.05 does not
    out = _apply_penalties(row[None], [thrice])[0]
    assert torch.allclose(out, torch.tensor([0.85, 0.9, 0.0, -1.05]))


def test_presence_and_frequency_ignore_prompt_tokens():
    row = torch.tensor([1.0, 0.9, 0.0, -1.0])
    state = make_state(prompt=[0, 0, 0], temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    assert greedy_token(row, state) == 0
    assert torch.equal(_apply_penalties(row[None], [state])[0], row)


def test_repetition_penalty_covers_prompt_and_output_and_matches_formula():
    row = torch.tensor([1.0, 0.9, 0.0, -1.0, -2.0, 0.5])
    assert greedy_token(row, make_state(prompt=[0], temperature=0.0)) == 0
    state = make_state(prompt=[0, 0, 3], temperature=0.0, repetition_penalty=1.5)
    assert greedy_token(row, state) == 1  # prompt token 0: 1.0 / 1.5 < 0.9
    with_history(state, [5, 5, 4])
    out = _apply_penalties(row[None], [state])[0]
    # positive / 1.5, negative * 1.5, once per token however often it was seen
    assert torch.allclose(out, torch.tensor([1.0 / 1.5, 0.9, 0.0, -1.5, -3.0, 0.5 / 1.5]))


def test_all_penalties_combine_in_order():
    row = torch.tensor([2.0, -1.0, 0.3, 0.0])
    state = with_history(
        make_state(prompt=[2], repetition_penalty=2.0, presence_penalty=0.1, frequency_penalty=0.3), [0, 0, 1]
    )
    out = _apply_penalties(row[None], [state])[0]
    expected = torch.tensor([2.0 / 2 - 0.1 - 0.6, -1.0 * 2 - 0.1 - 0.3, 0.3 / 2, 0.0])
    assert torch.allclose(out, expected)


def test_penalties_do_not_mutate_input_logits():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    before = logits.clone()
    state = with_history(make_state(presence_penalty=1.0, temperature=0.0), [0])
    Sampler(3).sample(logits, [state])
    assert torch.equal(logits, before)


# ----- logprobs ----------------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits():
    logits = random_logits(3)
    states = [
        make_state(logprobs=5, temperature=0.7, top_k=3, seed=1),
        with_history(make_state(logprobs=20, temperature=0.0, repetition_penalty=1.3, prompt=[1, 2]), [4]),
        make_state(logprobs=0, seed=2),
    ]
    result = Sampler(VOCAB).sample(logits, states)
    raw = torch.log_softmax(logits, dim=-1)
    for i, (n, entry) in enumerate(zip([5, 20, 0], result.logprobs)):
        assert entry.token_id == result.token_ids[i]
        assert entry.logprob == pytest.approx(raw[i, entry.token_id].item(), abs=1e-5)
        assert len(entry.top) == n
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in entry.top] == raw[i].topk(n).indices.tolist()
        assert values == pytest.approx(raw[i].topk(n).values.tolist(), abs=1e-5)
    assert result.logprobs[2].top == ()


def test_logprobs_none_when_not_requested():
    states = [make_state(logprobs=2), make_state(), make_state(temperature=0.0)]
    result = Sampler(VOCAB).sample(random_logits(3), states)
    assert result.logprobs[0] is not None
    assert result.logprobs[1:] == [None, None]


# ----- mixed batches -----------------------------------------------------------------------------

MIXED_ROWS = [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.4, presence_penalty=0.5, prompt=[1, 2, 3], logprobs=3),
    dict(temperature=0.8, top_k=8, top_p=0.9, seed=11),
    dict(temperature=1.3, min_p=0.05, frequency_penalty=0.7, seed=12, logprobs=1),
    dict(temperature=1.0, seed=13, repetition_penalty=0.8, prompt=[5], logprobs=0),
    dict(temperature=0.6, top_p=0.5, seed=14),
    dict(temperature=0.0, allowed_token_ids=(3, 9, 17, 30), logprobs=2),
    dict(temperature=0.9, top_p=0.8, seed=15, allowed_token_ids=(1, 4, 7, 30), presence_penalty=0.5),
]


def test_mixed_batch_matches_each_row_alone():
    steps = [random_logits(len(MIXED_ROWS) + 1, seed=100 + s) for s in range(12)]

    def fresh(row: dict) -> SamplingState:
        return make_state(**row)

    def run(states, rows):
        sampler, tokens, logprobs = Sampler(VOCAB, seed=5), [[] for _ in states], [[] for _ in states]
        for logits in steps:
            result = sampler.sample(logits[rows], states)
            for j, state in enumerate(states):
                state.record(result.token_ids[j])
                tokens[j].append(result.token_ids[j])
                logprobs[j].append(result.logprobs[j])
        return tokens, logprobs

    # Append an unseeded sampled row so the batch also exercises the shared generator.
    batch_states = [fresh(r) for r in MIXED_ROWS] + [make_state(temperature=1.0, top_k=4)]
    batch_tokens, batch_logprobs = run(batch_states, list(range(len(batch_states))))
    for i, row in enumerate(MIXED_ROWS):
        alone_tokens, alone_logprobs = run([fresh(row)], [i])
        assert batch_tokens[i] == alone_tokens[0], f"row {i}"
        assert batch_logprobs[i] == alone_logprobs[0], f"row {i}"
    unseeded_top4 = [set(x[-1].topk(4).indices.tolist()) for x in steps]
    assert all(t in allowed for t, allowed in zip(batch_tokens[-1], unseeded_top4))
    for i, row in enumerate(MIXED_ROWS):
        assert set(batch_tokens[i]) <= set(row.get("allowed_token_ids", range(VOCAB))), f"row {i}"
