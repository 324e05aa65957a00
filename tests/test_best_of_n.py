"""Best-of-n: the KL formulas against exact and simulated best-of-n, and real sampling with the gold."""

import itertools
import math

import numpy as np
import pytest

from rlhf_core.best_of_n import (
    analytic_kl,
    best_of_k_curve,
    best_of_n,
    best_of_n_probabilities,
    candidates_from_rows,
    discrete_kl,
    expected_best_of_n,
    kl_from_samples,
    measure_kl,
    sample_candidates,
    select_best,
)
from rlhf_core.generation import sample_responses
from rlhf_core.gold import gold_scores
from rlhf_core.models import load_causal_lm
from rlhf_core.prompts import load_prompts


@pytest.fixture(scope="module")
def base_model(tiny_profile):
    return load_causal_lm(tiny_profile.base_model)


def test_analytic_kl_values():
    assert analytic_kl(1) == 0.0
    assert analytic_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert analytic_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    np.testing.assert_allclose(analytic_kl(np.array([1, 4])), [0.0, math.log(4) - 0.75])


@pytest.mark.parametrize("n", [2, 4, 16])
def test_exact_discrete_kl_approaches_the_analytic_value_as_outcomes_get_fine(n):
    rng = np.random.default_rng(0)
    gaps = []
    for outcomes in (20, 200, 20_000):
        probabilities = rng.dirichlet(np.ones(outcomes))
        scores = rng.normal(size=outcomes)  # distinct: no ties
        kl = discrete_kl(probabilities, scores, n)
        assert kl <= analytic_kl(n) + 1e-12  # the analytic value bounds it (Beirami et al.)
        gaps.append(analytic_kl(n) - kl)
    assert gaps[-1] < 2e-3 and gaps[-1] < gaps[0]


def test_select_best_on_a_categorical_follows_the_exact_best_of_n_distribution():
    """Simulate best-of-n with the selection rule ``best_of_n`` uses, on a categorical whose exact
    best-of-n distribution is known, ties included; estimate the KL by Monte Carlo."""
    rng = np.random.default_rng(1)
    probabilities = np.array([0.30, 0.05, 0.15, 0.20, 0.10, 0.20])
    scores = np.array([0.0, 1.0, 1.0, 2.0, 3.0, 3.0])  # two tied levels
    n, trials = 4, 200_000
    draws = rng.choice(len(probabilities), size=(trials, n), p=probabilities)  # (trials, n) outcomes
    chosen = draws[np.arange(trials), select_best(scores[draws])]  # (trials,)
    frequencies = np.bincount(chosen, minlength=len(probabilities)) / trials
    exact = best_of_n_probabilities(probabilities, scores, n)
    assert exact.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(frequencies, exact, atol=0.005)
    monte_carlo_kl = float(np.mean(np.log(exact[chosen] / probabilities[chosen])))
    assert monte_carlo_kl == pytest.approx(discrete_kl(probabilities, scores, n), abs=0.01)
    assert discrete_kl(probabilities, scores, n) < analytic_kl(n)  # ties: less KL than the formula


def test_kl_from_samples_estimates_the_exact_kl():
    rng = np.random.default_rng(2)
    n = 8
    # tie-free scores: the estimate is the analytic value
    continuous = rng.normal(size=(3, 2000))
    np.testing.assert_allclose(kl_from_samples(continuous, n), analytic_kl(n), atol=2e-3)
    # a policy that writes its best response half the time, and whose other scores tie often
    # (rounded): best-of-n cannot move it far, and m samples per prompt measure by how much
    probabilities = np.concatenate([[0.5], np.full(100, 0.005)])
    scores = np.concatenate([[10.0], np.round(rng.normal(size=100), 1)])
    exact = discrete_kl(probabilities, scores, n)
    samples = scores[rng.choice(101, size=(4, 5000), p=probabilities)]  # (4 prompts, m)
    estimates = kl_from_samples(samples, n)
    assert exact < analytic_kl(n) - 0.4  # measured: 0.67 nats against 1.20
    np.testing.assert_allclose(estimates, exact, atol=0.05)


def test_expected_best_of_n_equals_the_average_over_all_subsets():
    rng = np.random.default_rng(3)
    proxy = np.array([[0.3, 1.0, -0.2, 1.0, 0.5, 2.0, 0.3, -1.0]])  # ties at 0.3 and 1.0
    target = rng.normal(size=(1, 8))
    for n in range(1, 9):
        values = []
        for subset in itertools.combinations(range(8), n):
            subset = np.array(subset)
            best = proxy[0, subset].max()
            values.append(target[0, subset][proxy[0, subset] == best].mean())  # uniform among ties
        assert expected_best_of_n(proxy, target, n)[0] == pytest.approx(np.mean(values)), n
    assert expected_best_of_n(proxy, target, 1)[0] == pytest.approx(target.mean())
    with pytest.raises(ValueError):
        expected_best_of_n(proxy, target, 9)


def test_best_of_1_is_plain_sampling(base_model, tokenizer, tiny_profile):
    prompts = load_prompts(tiny_profile, "eval", 12)
    result = best_of_n(base_model, tokenizer, prompts, 1, gold_scores, max_new_tokens=32, seed=5, batch_size=8)
    responses, ended = sample_responses(base_model, tokenizer, prompts, 32, batch_size=8, seed=5)
    assert result.responses == responses and result.ended == ended
    assert result.all_scores.shape == (12, 1) and (result.chosen_index == 0).all()


def test_candidates_are_sample_responses_on_the_repeated_prompts(random_tiny_model, tokenizer, tiny_profile):
    """What ``sample_candidates`` promises: rows j * P + i of ``sample_responses(prompts * n)``; its first
    sample of each prompt is ``sample_responses(prompts)``'s only when the batches line up."""
    prompts = load_prompts(tiny_profile, "eval", 6)
    candidates, ended = sample_candidates(random_tiny_model, tokenizer, prompts, 3, 12, seed=2, batch_size=4)
    responses, flags = sample_responses(random_tiny_model, tokenizer, prompts * 3, 12, batch_size=4, seed=2)
    assert candidates == [[responses[j * 6 + i] for j in range(3)] for i in range(6)]
    assert ended == [[flags[j * 6 + i] for j in range(3)] for i in range(6)]
    first = [row[0] for row in candidates]
    # 6 prompts, batches of 4: the second batch of the repeated prompts holds prompts 4, 5, 0, 1, so
    # prompts 4 and 5 are drawn alongside other rows than in sample_responses(prompts) (prompts 4, 5 alone)
    plain, _ = sample_responses(random_tiny_model, tokenizer, prompts, 12, batch_size=4, seed=2)
    assert first[:4] == plain[:4] and first[4:] != plain[4:]
    # 4 prompts, batches of 4: the batches line up, and the first samples are exactly plain sampling
    lined_up, _ = sample_candidates(random_tiny_model, tokenizer, prompts[:4], 3, 12, seed=2, batch_size=4)
    assert [row[0] for row in lined_up] == plain[:4]


def test_candidates_from_rows_regroups_per_prompt():
    rows = ["a0", "b0", "a1", "b1", "a2", "b2"]  # prompts a and b, three samples each
    candidates, ended = candidates_from_rows(rows, [True, False, True, True, False, True], 2)
    assert candidates == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    assert ended == [[True, True, False], [False, True, True]]
    with pytest.raises(ValueError, match="not n rows of 4 prompts"):
        candidates_from_rows(rows, [True] * 6, 4)


def test_best_of_k_curve_is_expected_best_of_n_at_each_k():
    rng = np.random.default_rng(4)
    rewards, golds = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    curve = best_of_k_curve(rewards, golds, 6)
    assert curve["n"] == [1, 2, 4, 6]
    for index, k in enumerate(curve["n"]):
        assert curve["kl"][index] == pytest.approx(analytic_kl(k))
        assert curve["gold"][index] == pytest.approx(expected_best_of_n(rewards, golds, k).mean())
        assert curve["reward"][index] == pytest.approx(expected_best_of_n(rewards, rewards, k).mean())
    assert curve["gold"][0] == pytest.approx(golds.mean())  # best-of-1 is the sampling policy itself


def test_best_of_n_with_the_gold_raises_the_gold(base_model, tokenizer, tiny_profile):
    prompts = load_prompts(tiny_profile, "eval", 32)
    plain = best_of_n(base_model, tokenizer, prompts, 1, gold_scores, max_new_tokens=48, seed=0, batch_size=64)
    best = best_of_n(base_model, tokenizer, prompts, 4, gold_scores, max_new_tokens=48, seed=0, batch_size=64)
    assert best.all_scores.shape == (32, 4)
    np.testing.assert_allclose(best.scores, best.all_scores.max(axis=1))
    np.testing.assert_allclose(best.scores, gold_scores(prompts, best.responses, best.ended))  # scored as chosen
    # the base model writes every mood: the best of 4 by gold is much better than one sample
    assert best.scores.mean() > plain.scores.mean() + 0.3
    assert best.scores.mean() == pytest.approx(expected_best_of_n(best.all_scores, best.all_scores, 4).mean())


def test_measured_kl_of_a_real_policy_is_at_most_the_analytic_value(base_model, tokenizer, tiny_profile):
    prompts = load_prompts(tiny_profile, "eval", 2)
    measured = measure_kl(
        base_model, tokenizer, prompts, 4, gold_scores, max_new_tokens=32, samples_per_prompt=48, seed=1
    )
    assert measured["per_prompt"].shape == (2,) and 0.0 <= measured["tied_fraction"] <= 1.0
    assert 0.3 < measured["kl"] <= analytic_kl(4) + 1e-12
