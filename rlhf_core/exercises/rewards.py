"""Checkers for the learning signals: per-token rewards (score at the last real token, KL penalty) and RLOO."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._checking import (
    _Case,
    _Checker,
    _rounded_randn,
    _run,
    _run_mask,
    _tensor,
)

# ---------------------------------------------------------------------------------------------
# GAE (the language-model case: the response ends at its last real token)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Per-token rewards of the PPO rollout
# ---------------------------------------------------------------------------------------------


def _reference_per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    B, T = kl.shape
    s, k, attention, response = scores.tolist(), kl.tolist(), attention_mask.tolist(), response_mask.tolist()
    rewards = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if response[b][t]:
                rewards[b][t] = -kl_coef * k[b][t]
        last_real = max(t for t in range(T) if attention[b][t])  # the EOS, or the last token of a cut response
        rewards[b][last_real] += s[b]
    return torch.tensor(rewards, dtype=torch.float64)


def _rewards_case(
    description: str,
    layout: Sequence[tuple[int, int, int]],
    T: int,
    kl_coef: float,
    generator: torch.Generator,
    hint: str,
) -> _Case:
    """``layout``: per row (left padding, prompt length, response length); right padding fills the rest."""
    B = len(layout)
    attention_mask = _run_mask(B, T, [(pad, prompt + response) for pad, prompt, response in layout])
    response_mask = _run_mask(B, T, [(pad + prompt, response) for pad, prompt, response in layout])
    scores = _rounded_randn((B,), generator, scale=2.0)
    kl = _rounded_randn((B, T), generator, scale=0.3)  # per-token KL estimates (k1 can be negative)
    expected = _reference_per_token_rewards(scores, kl, kl_coef, attention_mask, response_mask)
    return _Case(
        description, (scores, kl, kl_coef, attention_mask, response_mask), {"rewards": expected}, response_mask, hint
    )


def check_per_token_rewards(fn: Callable) -> bool:
    """Check ``fn(scores, kl, kl_coef, attention_mask, response_mask) -> rewards`` (B, T), like
    ``rlhf.compute_rewards``: -kl_coef * kl on every response token, plus the reward model's score (B,) at
    each row's last real token. Compared where ``response_mask`` is 1.
    """
    generator = torch.Generator().manual_seed(4)
    cases = [
        _rewards_case(
            "3 right-padded rows, prompt from column 0 (masks below), kl_coef = 0.1",
            [(0, 2, 3), (0, 3, 1), (0, 1, 4)],
            6,
            0.1,
            generator,
            "r_t = -kl_coef * kl_t on every response token (a penalty: note the minus), and the score is added "
            "at the last real token of the row (the last column where attention_mask is 1), not at the first "
            "padding position after it and not in the last column.",
        ),
        _rewards_case(
            "3 rows as the rollout lays them out: left-padded prompts, right-padded responses (masks below), "
            "kl_coef = 0.05",
            [(2, 2, 2), (0, 3, 3), (1, 1, 2)],
            6,
            0.05,
            generator,
            "with left padding the last real token is not at attention_mask.sum() - 1: find, in each row, the "
            "last column where attention_mask is 1.",
        ),
        _rewards_case(
            "kl_coef = 0: the only reward is the score",
            [(1, 2, 3), (0, 2, 2)],
            6,
            0.0,
            generator,
            "with kl_coef = 0 every response token gets 0, except the last real token, which gets the score.",
        ),
        _rewards_case(
            "edge rows: a one-token response, and a response that fills the last column (masks below), kl_coef = 0.2",
            [(3, 2, 1), (0, 2, 5), (1, 3, 3)],
            7,
            0.2,
            generator,
            "a one-token response gets its KL penalty and the score on the same token; a response that reaches "
            "the last column has no padding after it. Add the score to the KL term, do not replace it.",
        ),
    ]
    checker = _Checker(
        name="check_per_token_rewards",
        arg_names=("scores", "kl", "kl_coef", "attention_mask", "response_mask"),
        cases=cases,
        grad_args=(),
        shape_hint="(B, T), the shape of kl",
        start_hint="start from rewards = -kl_coef * kl * response_mask, then for each row b add scores[b] at "
        "the last column where attention_mask[b] is 1.",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# RLOO: the leave-one-out baseline (chapter 08)
# ---------------------------------------------------------------------------------------------


def _reference_rloo(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    values = scores.tolist()
    advantages = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]  # the k samples of one prompt
        for i, score in enumerate(group):
            others = group[:i] + group[i + 1 :]
            advantages.append(score - sum(others) / len(others))
    return torch.tensor(advantages, dtype=torch.float64)


def _rloo_case(description: str, scores, group_size: int, hint: str) -> _Case:
    scores = _tensor(scores)
    return _Case(description, (scores, group_size), {"advantages": _reference_rloo(scores, group_size)}, None, hint)


def check_rloo_advantages(fn: Callable) -> bool:
    """Check ``fn(scores, group_size) -> advantages``, both (P * k,), like
    ``grpo.group_advantages(scores, group_size, "rloo")``.

    The k = ``group_size`` samples of prompt i are the consecutive entries i*k ... i*k + k - 1; each
    sample's advantage is its score minus the mean score of the other k - 1 samples of its prompt.
    """
    generator = torch.Generator().manual_seed(5)
    cases = [
        _rloo_case(
            "one prompt, k = 2 samples scored 1.0 and 0.0",
            [1.0, 0.0],
            2,
            "each sample's baseline is the mean of the OTHER k - 1 scores of its group (not including its own): "
            "A_i = r_i - (sum of the group - r_i) / (k - 1).",
        ),
        _rloo_case(
            "2 prompts, k = 4 samples each",
            _rounded_randn((8,), generator).tolist(),
            4,
            "the k samples of prompt i are the consecutive entries i*k ... i*k + k - 1, so "
            "scores.view(-1, group_size) has one row per prompt (scores.view(group_size, -1) mixes prompts).",
        ),
        _rloo_case(
            "2 prompts, k = 3: a group of equal scores and a group with a tie",
            [0.5, 0.5, 0.5, 1.0, 1.0, -2.0],
            3,
            "a group whose scores are all equal gets zero advantages: no sample did better than its peers. The "
            "leave-one-out baseline needs no division by a standard deviation.",
        ),
        _rloo_case(
            "3 prompts of different difficulty (scores around 10, 0 and -5), k = 5",
            (_rounded_randn((15,), generator) + torch.tensor([10.0] * 5 + [0.0] * 5 + [-5.0] * 5)).tolist(),
            5,
            "each prompt has its own baseline, from its own samples only: a batch-wide mean would reward easy "
            "prompts and punish hard ones.",
        ),
    ]
    checker = _Checker(
        name="check_rloo_advantages",
        arg_names=("scores", "group_size"),
        cases=cases,
        grad_args=(),
        shape_hint="(P * k,), the shape of scores",
        start_hint="reshape scores to (P, k) with scores.view(-1, group_size); the baseline of sample i is "
        "(group sum - r_i) / (k - 1); return the advantages flattened back to (P * k,).",
    )
    return _run(checker, fn)
