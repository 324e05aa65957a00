"""Checkers for the policy-gradient formulas: GAE and the clipped policy loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._checking import (
    _Case,
    _Checker,
    _rounded_randn,
    _run,
    _run_mask,
    _tensor,
    _with_padding,
)

# ---------------------------------------------------------------------------------------------
# GAE (the language-model case: the response ends at its last real token)
# ---------------------------------------------------------------------------------------------


def _reference_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    advantages = [[0.0] * T for _ in range(B)]
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_advantage = 0.0
        for t in reversed(range(T)):
            if not m[b][t]:
                next_advantage = 0.0
                continue
            continues = t + 1 < T and m[b][t + 1] > 0  # the response goes on after token t
            next_value = v[b][t + 1] if continues else 0.0
            delta = r[b][t] + gamma * next_value - v[b][t]
            advantage = delta + (gamma * lam * next_advantage if continues else 0.0)
            advantages[b][t] = advantage
            returns[b][t] = advantage + v[b][t]
            next_advantage = advantage
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return as_tensor(advantages), as_tensor(returns)


def _gae_case(
    description: str,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    hint: str,
) -> _Case:
    advantages, returns = _reference_gae(rewards, values, mask, gamma, lam)
    return _Case(
        description, (rewards, values, mask, gamma, lam), {"advantages": advantages, "returns": returns}, mask, hint
    )


def _gae_cases() -> list[_Case]:
    generator = torch.Generator().manual_seed(0)
    cases = [
        _gae_case(
            "one response of 4 tokens, no padding, gamma = lam = 1, the reward on the last token",
            _tensor([[0.0, 0.0, 0.0, 1.0]]),
            _tensor([[0.5, 0.2, -0.1, 0.3]]),
            torch.ones(1, 4),
            1.0,
            1.0,
            "with gamma = lam = 1, A_t is the sum of the rewards from t to the end minus V(s_t), and "
            "returns = advantages + values. Loop backwards from the last token; after it comes nothing "
            "(no V(s_{t+1}), no A_{t+1}).",
        ),
        _gae_case(
            "two responses of 5 tokens, no padding, gamma = 0.9, lam = 0.95",
            _rounded_randn((2, 5), generator),
            _rounded_randn((2, 5), generator),
            torch.ones(2, 5),
            0.9,
            0.95,
            "delta_t = r_t + gamma * V(s_{t+1}) - V(s_t) and A_t = delta_t + gamma * lam * A_{t+1}: "
            "check that both gamma and lam appear where they should.",
        ),
        _gae_case(
            "lam = 0 (one-step TD errors), gamma = 0.8, no padding",
            _rounded_randn((2, 4), generator),
            _rounded_randn((2, 4), generator),
            torch.ones(2, 4),
            0.8,
            0.0,
            "with lam = 0 each advantage is the one-step TD error delta_t = r_t + gamma * V(s_{t+1}) - V(s_t).",
        ),
    ]
    mask = _run_mask(3, 5, [(0, 5), (0, 3), (0, 1)])
    cases.append(
        _gae_case(
            "3 right-padded rows of lengths 5, 3 and 1 (mask below); the padding holds 7.0 in rewards and values",
            _with_padding(_rounded_randn((3, 5), generator), mask, 7.0),
            _with_padding(_rounded_randn((3, 5), generator), mask, 7.0),
            mask,
            1.0,
            0.95,
            "a response ends at its last real token (a 1 followed by a 0 in the mask): there "
            "delta_t = r_t - V(s_t), with no V(s_{t+1}) and no A_{t+1} taken from the padding. The padding "
            "here holds 7.0 to make a leak visible: use the mask so that padding never changes a result.",
        )
    )
    mask = _run_mask(3, 7, [(2, 4), (4, 3), (1, 6)])
    cases.append(
        _gae_case(
            "3 responses that start after a left-padded prompt and end before the last column (mask below); "
            "everything outside the mask holds -3.0, gamma = 1, lam = 0.95",
            _with_padding(_rounded_randn((3, 7), generator), mask, -3.0),
            _with_padding(_rounded_randn((3, 7), generator), mask, -3.0),
            mask,
            1.0,
            0.95,
            "the mask can start after column 0 (prompt tokens and padding come first) and end before the last "
            "column. The recursion runs over the real tokens only, from the last one backwards.",
        )
    )
    mask = _run_mask(4, 6, [(0, 6), (5, 1), (1, 2), (3, 3)])
    cases.append(
        _gae_case(
            "a mixed batch: a full row, a one-token response in the last column, and two short ones (mask "
            "below); the padding holds 5.0, gamma = 0.99, lam = 0.9",
            _with_padding(_rounded_randn((4, 6), generator), mask, 5.0),
            _with_padding(_rounded_randn((4, 6), generator), mask, 5.0),
            mask,
            0.99,
            0.9,
            "a one-token response has A = r - V; a response that reaches the last column has nothing after it. "
            "Every row is independent of the others.",
        )
    )
    return cases


def check_gae(fn: Callable) -> bool:
    """Check ``fn(rewards, values, mask, gamma, lam) -> (advantages, returns)``, all (B, T), like ``ppo.gae``.

    The language-model case: each row is one response, ``mask`` marks its tokens (contiguous, possibly
    after a padded prompt), and the response ends at its last real token. Both outputs are checked
    where ``mask`` is 1.
    """
    checker = _Checker(
        name="check_gae",
        arg_names=("rewards", "values", "mask", "gamma", "lam"),
        cases=_gae_cases(),
        grad_args=(),
        shape_hint="(B, T), the shape of rewards",
        start_hint="loop t backwards over the columns: delta_t = r_t + gamma * V(s_{t+1}) * m_{t+1} - V(s_t), "
        "A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}, where m_{t+1} = mask[:, t + 1] (0 after the "
        "last column); returns = advantages + values.",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# PPO's clipped policy loss
# ---------------------------------------------------------------------------------------------


def _reference_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> torch.Tensor:
    total, count = 0.0, 0
    for new, old, advantage, real in zip(
        logprobs.flatten().tolist(),
        old_logprobs.flatten().tolist(),
        advantages.flatten().tolist(),
        mask.flatten().tolist(),
    ):
        if not real:
            continue
        ratio = math.exp(new - old)
        clipped_ratio = min(max(ratio, 1.0 - clip_range), 1.0 + clip_range)
        total += max(-advantage * ratio, -advantage * clipped_ratio)  # the pessimistic bound
        count += 1
    return torch.tensor(total / count, dtype=torch.float64)


def _policy_case(
    description: str,
    ratios,
    advantages,
    mask: torch.Tensor,
    clip_range: float,
    old_logprobs,
    hint: str,
    padding: float = 0.0,
) -> _Case:
    ratios, advantages, old_logprobs = _tensor(ratios), _tensor(advantages), _tensor(old_logprobs)
    logprobs = old_logprobs + torch.log(ratios)  # (B, T): so that exp(logprobs - old_logprobs) = ratios
    logprobs = _with_padding(logprobs, mask, padding)
    old_logprobs = _with_padding(old_logprobs, mask, -padding)
    advantages = _with_padding(advantages, mask, padding)
    expected = _reference_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
    return _Case(description, (logprobs, old_logprobs, advantages, mask, clip_range), {"loss": expected}, None, hint)


def _policy_loss_cases() -> list[_Case]:
    generator = torch.Generator().manual_seed(1)

    def old_logprobs(B: int, T: int) -> torch.Tensor:  # log-probs of sampled tokens, in [-3, -0.5]
        return -0.5 - 2.5 * torch.rand(B, T, generator=generator)

    return [
        _policy_case(
            "ratios all 1 (logprobs == old_logprobs), no padding, clip_range = 0.2",
            [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
            [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]],
            torch.ones(2, 3),
            0.2,
            old_logprobs(2, 3),
            "at ratio 1 the loss is -mean(advantages). PPO maximises the surrogate ratio * A, so the loss to "
            "minimise carries a minus sign.",
        ),
        _policy_case(
            "ratios inside [1 - clip_range, 1 + clip_range], advantages of both signs, no padding",
            [[1.1, 0.9, 1.05, 0.95]],
            [[1.0, -2.0, -0.5, 1.5]],
            torch.ones(1, 4),
            0.2,
            old_logprobs(1, 4),
            "inside the clip range the loss is -mean(advantages * ratio), with ratio = exp(logprobs - "
            "old_logprobs) (a ratio of probabilities, not of log-probs).",
        ),
        _policy_case(
            "ratios 1.5 and 0.5, outside the clip range 0.2, each with a positive and a negative advantage",
            [[1.5, 0.5, 1.5, 0.5], [1.3, 0.7, 1.25, 0.75]],
            [[1.0, 1.0, -1.0, -1.0], [2.0, -2.0, -0.5, 0.5]],
            torch.ones(2, 4),
            0.2,
            old_logprobs(2, 4),
            "per token, keep the pessimistic (larger) loss: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)). "
            "With A > 0 and a ratio below 1 - eps, or A < 0 and a ratio above 1 + eps, the unclipped term is "
            "the larger one: clipping never hides a loss, it only removes the gain of moving further.",
        ),
        _policy_case(
            "3 right-padded rows of lengths 4, 2 and 1 (mask below), ratios in and out of the clip range; "
            "the padding holds +-4.0",
            [[1.4, 0.9, 1.0, 0.6], [1.1, 0.7, 1.0, 1.0], [1.3, 1.0, 1.0, 1.0]],
            [[0.3, -1.2, 0.8, 1.0], [-0.4, 2.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0]],
            _run_mask(3, 4, [(0, 4), (0, 2), (0, 1)]),
            0.2,
            old_logprobs(3, 4),
            "the loss is the mean over every real token of the batch: the sum over the mask divided by the "
            "number of real tokens. Not a mean per row averaged over rows, and padding (+-4.0 here) must not count.",
            padding=4.0,
        ),
        _policy_case(
            "3 responses after left-padded prompts (mask below), clip_range = 0.1; the padding holds +-2.0",
            [[1.0, 1.0, 1.2, 0.8, 1.05], [1.0, 0.85, 1.15, 1.0, 1.0], [0.95, 1.3, 0.6, 1.1, 1.0]],
            [[0.0, 0.0, -0.7, 0.9, 1.1], [0.0, 1.3, 0.4, 0.0, 0.0], [-1.0, -0.2, 0.6, 0.8, 0.0]],
            _run_mask(3, 5, [(2, 3), (1, 2), (0, 4)]),
            0.1,
            old_logprobs(3, 5),
            "use clip_range as given (here 0.1), and average over the real tokens only, wherever they sit in the row.",
            padding=-2.0,
        ),
    ]


def check_policy_loss(fn: Callable) -> bool:
    """Check ``fn(logprobs, old_logprobs, advantages, mask, clip_range) -> loss``, like ``ppo.policy_loss``.

    The loss is PPO's clipped surrogate, to minimise, averaged over every real token of the batch.
    A returned tuple (``policy_loss`` returns ``(loss, stats)``) is checked on its first element.
    """
    checker = _Checker(
        name="check_policy_loss",
        arg_names=("logprobs", "old_logprobs", "advantages", "mask", "clip_range"),
        cases=_policy_loss_cases(),
        grad_args=(0,),
        shape_hint="a scalar: one loss for the whole batch",
        start_hint="ratio = exp(logprobs - old_logprobs); per token take max(-A * ratio, -A * clamp(ratio, "
        "1 - clip_range, 1 + clip_range)), then the mean over the positions where mask is 1.",
    )
    return _run(checker, fn)
