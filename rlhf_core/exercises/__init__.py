"""Checked exercises: write a formula yourself, then let a checker compare it with the answer.

Each ``check_*`` function takes *your* function and calls it positionally with float32 tensors, with
the same signature as the library function it mirrors:

- ``check_gae``: ``fn(rewards, values, mask, gamma, lam) -> (advantages, returns)``, all (B, T),
  like ``rlhf_core.ppo.gae`` in its language-model form (no ``dones``).
- ``check_policy_loss``: ``fn(logprobs, old_logprobs, advantages, mask, clip_range) -> loss``, a
  scalar, like ``rlhf_core.ppo.policy_loss``.
- ``check_bradley_terry_loss``: ``fn(chosen_scores, rejected_scores) -> loss``, a scalar, like
  ``rlhf_core.reward_model.bradley_terry_loss``.
- ``check_dpo_loss``: ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
  ref_rejected_logps, beta) -> losses`` (B,), like ``rlhf_core.dpo.dpo_loss``.
- ``check_per_token_rewards``: ``fn(scores, kl, kl_coef, attention_mask, response_mask) -> rewards``
  (B, T), like ``rlhf_core.rlhf.compute_rewards``.
- ``check_rloo_advantages``: ``fn(scores, group_size) -> advantages`` (P * k,), like
  ``rlhf_core.grpo.group_advantages(scores, group_size, "rloo")``.

How a checker behaves:

- It runs several cases, from the simplest to the edge cases: padded and ragged batches (padding
  filled with numbers that must not matter), ratios outside the clip range, large margins that
  overflow a naive formula, ties.
- ``check_gae`` checks both outputs. The others, given a tuple, check its first element, so
  ``policy_loss`` with its stats and ``dpo_loss`` with its implicit rewards pass as they are.
- Values are compared within a float tolerance, only where the mask is 1.
- A correct function prints one line and returns ``True``.
- A wrong one raises ``AssertionError`` naming the case, the first wrong entry (expected, and what
  came back), the inputs, and a hint.
- A function that still raises ``NotImplementedError`` gets a printed hint, and the checker
  returns ``False``.

The expected answers come from plain Python loops written below, one element at a time, and never
from the library function being mirrored: the tests show that the library's functions pass.
"""

from .policy_gradient import check_gae, check_policy_loss
from .preferences import check_bradley_terry_loss, check_dpo_loss
from .rewards import check_per_token_rewards, check_rloo_advantages

__all__ = [
    "check_gae",
    "check_policy_loss",
    "check_bradley_terry_loss",
    "check_dpo_loss",
    "check_per_token_rewards",
    "check_rloo_advantages",
]
