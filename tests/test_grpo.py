"""rlhf_core.grpo.group_advantages against plain Python loops over each prompt's group."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhf_core.errors import CourseError
from rlhf_core.grpo import group_advantages


def reference_advantages(scores: list[float], k: int, method: str) -> list[float]:
    """One group at a time, one sample at a time, with the statistics module."""
    advantages = []
    for start in range(0, len(scores), k):
        group = scores[start : start + k]
        mean = sum(group) / k
        for i, r in enumerate(group):
            if method == "grpo":
                advantages.append((r - mean) / (statistics.stdev(group) + 1e-4))
            elif method == "dr_grpo":
                advantages.append(r - mean)
            else:
                others = group[:i] + group[i + 1 :]
                advantages.append(r - sum(others) / len(others))
    return advantages


def scores_with_ties(n_prompts: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(P * k,) float64 scores; prompt 0's group is all equal, prompt 1's has two equal scores."""
    scores = torch.randn(n_prompts * k, generator=generator, dtype=torch.float64) * 2.0
    scores[0:k] = 0.75
    scores[k + 1] = scores[k]
    return scores


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_group_advantages_match_plain_loops(method, k):
    generator = torch.Generator().manual_seed(k)
    scores = scores_with_ties(n_prompts=4, k=k, generator=generator)
    advantages = group_advantages(scores, k, method)
    assert advantages.shape == scores.shape
    expected = torch.tensor(reference_advantages(scores.tolist(), k, method), dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_an_all_equal_group_gets_zero_advantages_not_nan(method):
    scores = torch.tensor([3.0, 3.0, 3.0, 3.0, 1.0, 2.0, 3.0, 4.0])
    advantages = group_advantages(scores, 4, method)
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[:4], torch.zeros(4))
    assert not torch.equal(advantages[4:], torch.zeros(4))


def test_groups_are_consecutive_rows_and_independent():
    # Shifting one prompt's scores by a constant changes none of its advantages, nor the other prompt's.
    scores = torch.tensor([1.0, 0.0, 2.0, 5.0, 5.5, 4.0])
    shifted = scores.clone()
    shifted[3:] += 100.0
    for method in ("grpo", "dr_grpo", "rloo"):
        torch.testing.assert_close(group_advantages(scores, 3, method), group_advantages(shifted, 3, method))
    # By hand, rloo on the first group: 1 - (0 + 2) / 2, 0 - (1 + 2) / 2, 2 - (1 + 0) / 2.
    torch.testing.assert_close(group_advantages(scores, 3, "rloo")[:3], torch.tensor([0.0, -1.5, 1.5]))


def test_rloo_is_dr_grpo_scaled_by_k_over_k_minus_one():
    scores = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (2, 4, 5):
        torch.testing.assert_close(
            group_advantages(scores, k, "rloo"), k / (k - 1) * group_advantages(scores, k, "dr_grpo")
        )


def test_grpo_uses_the_unbiased_std():
    # k = 2 with scores 0 and 2: unbiased std sqrt(2), population std 1.
    advantages = group_advantages(torch.tensor([0.0, 2.0], dtype=torch.float64), 2, "grpo")
    expected = 1.0 / (math.sqrt(2.0) + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([-expected, expected], dtype=torch.float64))


def test_integer_scores_are_accepted():
    torch.testing.assert_close(group_advantages(torch.tensor([1, 3]), 2, "dr_grpo"), torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize(
    ("scores", "group_size", "method", "message"),
    [
        (torch.zeros(4), 1, "grpo", "group_size must be an integer of at least 2"),
        (torch.zeros(4), 0, "rloo", "group_size must be an integer of at least 2"),
        (torch.zeros(4), 2.0, "rloo", "group_size must be an integer of at least 2"),
        (torch.zeros(6), 4, "grpo", "6 scores do not split into groups of group_size=4"),
        (torch.zeros(4), 2, "ppo", "unknown method 'ppo'"),
        (torch.zeros(2, 2), 2, "grpo", r"one flat \(P \* k,\) tensor"),
    ],
)
def test_bad_arguments_raise_a_course_error(scores, group_size, method, message):
    with pytest.raises(CourseError, match=message):
        group_advantages(scores, group_size, method)
