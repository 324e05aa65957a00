"""Checkers for the preference losses: Bradley-Terry (the reward model) and DPO."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._checking import (
    _Case,
    _Checker,
    _rounded_randn,
    _run,
    _tensor,
)

# ---------------------------------------------------------------------------------------------
# The reward model's Bradley-Terry loss
# ---------------------------------------------------------------------------------------------


def _softplus(x: float) -> float:
    """log(1 + e^x), exact for large |x|: -log sigmoid(z) = softplus(-z)."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _reference_bradley_terry(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    losses = [_softplus(-(c - r)) for c, r in zip(chosen_scores.tolist(), rejected_scores.tolist())]
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def _bradley_terry_case(description: str, chosen, rejected, hint: str) -> _Case:
    chosen, rejected = _tensor(chosen), _tensor(rejected)
    return _Case(description, (chosen, rejected), {"loss": _reference_bradley_terry(chosen, rejected)}, None, hint)


def check_bradley_terry_loss(fn: Callable) -> bool:
    """Check ``fn(chosen_scores, rejected_scores) -> loss``, like ``reward_model.bradley_terry_loss``.

    Scores are (B,), one per pair; the loss is the mean over the pairs of -log sigmoid(chosen - rejected).
    """
    generator = torch.Generator().manual_seed(2)
    cases = [
        _bradley_terry_case(
            "one pair, the chosen response scored 1.0 and the rejected 0.0",
            [1.0],
            [0.0],
            "loss = -log sigmoid(chosen - rejected): small when the chosen response scores higher. Check the "
            "sign and the order of the difference.",
        ),
        _bradley_terry_case(
            "6 pairs, some ranked right and some wrong",
            _rounded_randn((6,), generator).tolist(),
            _rounded_randn((6,), generator).tolist(),
            "return the mean over the pairs: one number, not the sum and not one loss per pair.",
        ),
        _bradley_terry_case(
            "3 pairs with equal scores (each loss is log 2)",
            [0.5, -1.0, 2.0],
            [0.5, -1.0, 2.0],
            "when chosen and rejected score the same, sigmoid(0) = 1/2 and the loss is log 2 = 0.6931.",
        ),
        _bradley_terry_case(
            "4 pairs with large score differences (+-30, +-200)",
            [30.0, -30.0, 200.0, -100.0],
            [0.0, 0.0, 0.0, 100.0],
            "for a very negative difference x, torch.log(torch.sigmoid(x)) computes log(0) = -inf in float32. "
            "Use torch.nn.functional.logsigmoid(x) (or -softplus(-x)), which is exact there.",
        ),
    ]
    checker = _Checker(
        name="check_bradley_terry_loss",
        arg_names=("chosen_scores", "rejected_scores"),
        cases=cases,
        grad_args=(0, 1),
        shape_hint="a scalar: the mean loss over the pairs",
        start_hint="the probability that the chosen response wins is sigmoid(chosen - rejected); the loss is "
        "its negative log, averaged over the pairs (torch.nn.functional.logsigmoid helps).",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# DPO's per-pair loss
# ---------------------------------------------------------------------------------------------


def _reference_dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    losses = []
    for pc, pr, rc, rr in zip(
        policy_chosen.tolist(), policy_rejected.tolist(), ref_chosen.tolist(), ref_rejected.tolist()
    ):
        margin = (pc - pr) - (rc - rr)  # how much more the policy prefers the chosen response than pi_ref does
        losses.append(_softplus(-beta * margin))  # -log sigmoid(beta * margin)
    return torch.tensor(losses, dtype=torch.float64)


def _dpo_case(
    description: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, hint: str
) -> _Case:
    args = tuple(_tensor(x) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    return _Case(description, (*args, beta), {"losses": _reference_dpo(*args, beta)}, None, hint)


def check_dpo_loss(fn: Callable) -> bool:
    """Check ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    -> losses``, one per pair (B,), like ``dpo.dpo_loss`` with its default sigmoid loss.

    A returned tuple (``dpo_loss`` returns ``(losses, chosen_rewards, rejected_rewards)``) is checked on its
    first element.
    """
    generator = torch.Generator().manual_seed(3)

    def logps(n: int) -> list[float]:  # summed response log-probs, in [-60, -10]
        return (-10.0 - 50.0 * torch.rand(n, generator=generator)).round(decimals=2).tolist()

    same_chosen, same_rejected = logps(3), logps(3)
    ref_chosen, ref_rejected = logps(4), logps(4)
    cases = [
        _dpo_case(
            "3 pairs where the policy equals the reference (every loss is log 2), beta = 0.1",
            same_chosen,
            same_rejected,
            same_chosen,
            same_rejected,
            0.1,
            "when the policy equals the reference, every loss is log 2 = 0.6931, whatever the log-probs: DPO "
            "scores how much *more* the policy prefers the chosen response than pi_ref does. Subtract the "
            "reference's log-ratio (ref_chosen - ref_rejected).",
        ),
        _dpo_case(
            "4 pairs, the policy moved away from the reference, beta = 0.1",
            [c + d for c, d in zip(ref_chosen, [2.0, -1.0, 0.5, 3.0])],
            [r + d for r, d in zip(ref_rejected, [-1.0, 1.5, 0.0, 2.0])],
            ref_chosen,
            ref_rejected,
            0.1,
            "loss_i = -log sigmoid(beta * ((pi_chosen - pi_rejected) - (ref_chosen - ref_rejected))), one per "
            "pair; beta multiplies the margin inside the sigmoid.",
        ),
        _dpo_case(
            "3 pairs where the reference prefers the rejected response, beta = 0.5",
            [-20.0, -35.5, -12.25],
            [-22.0, -30.0, -15.0],
            [-25.0, -40.0, -14.0],
            [-18.0, -31.0, -13.0],
            0.5,
            "use beta as given (0.5 here), and keep the order: chosen minus rejected, policy minus reference.",
        ),
        _dpo_case(
            "2 pairs with large margins (+-150 nats), beta = 1.0",
            [-10.0, -160.0],
            [-160.0, -10.0],
            [-50.0, -50.0],
            [-50.0, -50.0],
            1.0,
            "for a very negative x, torch.log(torch.sigmoid(x)) computes log(0) = -inf in float32. Use "
            "torch.nn.functional.logsigmoid(x), which is exact there.",
        ),
    ]
    checker = _Checker(
        name="check_dpo_loss",
        arg_names=("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta"),
        cases=cases,
        grad_args=(0, 1),
        shape_hint="(B,): one loss per pair; do not average, the trainer does",
        start_hint="margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected); "
        "losses = -logsigmoid(beta * margin), one per pair.",
    )
    return _run(checker, fn)
