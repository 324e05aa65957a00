"""Baselines from a group of samples (chapter 08): the advantages of RLOO, GRPO and Dr. GRPO.

PPO (chapters 04-06) needs a fourth model, the value head V(s_t), only to get a *baseline*: a
number to subtract from the reward so that the policy gradient says "better or worse than usual"
instead of "good" for every positive reward. A baseline need not come from a learned critic. Sample
k responses y_1 ... y_k to the same prompt x, score each one (r_i = r_phi(x, y_i), one number per
response, as best-of-n does), and compare each sample with its siblings: the other samples of the
same prompt show what the policy usually earns on that prompt. No value model to train or hold in
memory, and no GAE: every token of response i gets the same advantage A_i.

With r = (r_1 ... r_k) the scores of one prompt's group:

- **RLOO**, REINFORCE Leave-One-Out: A_i = r_i - mean_{j != i} r_j, the mean of the *other* k - 1
  scores. The baseline does not depend on y_i, so the gradient estimate stays unbiased. Since
  mean_{j != i} r_j = (k mean(r) - r_i) / (k - 1), A_i = k / (k - 1) * (r_i - mean(r)).
  Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; brought to RLHF by
  Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization ...", ACL 2024.
- **GRPO**, Group Relative Policy Optimization: A_i = (r_i - mean(r)) / (std(r) + eps), the score
  standardised within its group (here with the unbiased std, as ``torch.std`` computes it, and
  eps = 1e-4 so that a group of equal scores gets 0, not 0 / 0). Shao et al., "DeepSeekMath", 2024.
- **Dr. GRPO**, "GRPO done right": A_i = r_i - mean(r). Dividing by std(r) weights prompts
  unevenly: a group whose scores barely differ (a prompt that is too easy or too hard) has its
  small differences blown up to unit scale. Dr. GRPO drops the division (and, in the loss, GRPO's
  division of each response's token sum by its own length, which penalises a long wrong answer
  less per token than a short one). Liu et al., "Understanding R1-Zero-Like Training", 2025.

Layout: the k samples of prompt i are the consecutive rows i*k ... i*k + k - 1 of a flat (P * k,)
tensor, so ``scores.view(P, k)`` has one row per prompt. The loop that
uses them is ``rlhf_core.grpo``, as ``rlhf_core.rlhf`` uses ``rlhf_core.ppo``.
"""

from __future__ import annotations

import torch

from .errors import CourseError

ADVANTAGE_METHODS = ("grpo", "dr_grpo", "rloo")

# Added to the group's std before dividing, so an all-equal group gives 0 / 1e-4 = 0 (TRL's value).
GRPO_STD_EPS = 1e-4


def group_advantages(scores: torch.Tensor, group_size: int, method: str = "grpo") -> torch.Tensor:
    """Advantages of P * k samples, each compared with the other samples of its prompt.

    scores: (P * k,), the k = ``group_size`` samples of prompt i at entries i*k ... i*k + k - 1.
    method: ``"grpo"`` (r - mean) / (std + 1e-4), unbiased std; ``"dr_grpo"`` r - mean;
    ``"rloo"`` r_i minus the mean of the other k - 1 scores.
    Returns advantages of shape (P * k,), in the same order as ``scores``.
    """
    if method not in ADVANTAGE_METHODS:
        raise CourseError(f"group_advantages: unknown method {method!r}; use one of {', '.join(ADVANTAGE_METHODS)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise CourseError(
            f"group_advantages: group_size must be an integer of at least 2 (got {group_size!r}): a baseline "
            "from a prompt's other samples needs two or more samples per prompt; set group_size >= 2"
        )
    if scores.dim() != 1:
        raise CourseError(
            f"group_advantages: scores must be one flat (P * k,) tensor, got shape {tuple(scores.shape)}; "
            "pass scores.flatten() with each prompt's k samples next to each other"
        )
    if scores.shape[0] % group_size != 0:
        raise CourseError(
            f"group_advantages: {scores.shape[0]} scores do not split into groups of group_size={group_size}; "
            "generate exactly group_size samples for every prompt"
        )
    if not scores.is_floating_point():
        scores = scores.float()

    groups = scores.view(-1, group_size)  # (P, k): one row per prompt
    group_mean = groups.mean(dim=1, keepdim=True)  # (P, 1)
    if method == "grpo":
        group_std = groups.std(dim=1, keepdim=True)  # (P, 1), unbiased (divides by k - 1)
        advantages = (groups - group_mean) / (group_std + GRPO_STD_EPS)  # (P, k)
    elif method == "dr_grpo":
        advantages = groups - group_mean  # (P, k)
    else:  # "rloo"
        leave_one_out_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)  # (P, k)
        advantages = groups - leave_one_out_mean  # (P, k)
    return advantages.reshape(-1)  # (P * k,)
