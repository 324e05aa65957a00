"""The PPO math, as short functions to read next to the equations.

One implementation serves two loops:

- the gymnasium agent of chapter 00 (``rlhf_core.gym_ppo``), where a batch is laid out as
  (B, T) = (parallel environments, steps of the rollout), and
- the language-model PPO loop of chapters 04-06, where (B, T) = (responses, response tokens),
  the reward arrives at the last real token (plus a per-token KL penalty to pi_ref), and a
  ``mask`` marks the real response tokens because responses have different lengths.

Every function takes (B, T) tensors and a ``mask`` of the same shape (1.0 / True on real
positions, 0.0 / False on padding). Padding never changes a result: values at masked-out positions
are ignored, whatever they hold. The functions also accept any other shape whose mask matches
(for example the flat minibatches of the gym agent).

References
----------
- J. Schulman, F. Wolski, P. Dhariwal, A. Radford, O. Klimov. "Proximal Policy Optimization
  Algorithms", 2017. arXiv:1707.06347. (clipped surrogate objective)
- J. Schulman, P. Moritz, S. Levine, M. Jordan, P. Abbeel. "High-Dimensional Continuous Control
  Using Generalized Advantage Estimation", ICLR 2016. arXiv:1506.02438. (GAE)
- D. Ziegler, N. Stiennon, J. Wu, T. Brown, A. Radford, D. Amodei, P. Christiano, G. Irving.
  "Fine-Tuning Language Models from Human Preferences", 2019. arXiv:1909.08593. (adaptive KL)
- S. Huang, R. Dossa, A. Raffin, A. Kanervisto, W. Wang. "The 37 Implementation Details of
  Proximal Policy Optimization", ICLR Blog Track 2022. (value clipping, advantage normalisation,
  clip fraction and approx-KL diagnostics)
- S. Huang, T. Liu, L. von Werra. "The N Implementation Details of RLHF with PPO", 2023.
  (masked whitening of rewards and advantages, the same math on token sequences)
- J. Schulman. "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html
  (the k1 / k2 / k3 estimators)
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "gae",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "KL_ESTIMATORS",
    "kl_estimate",
    "clip_fraction",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
]


# ---------------------------------------------------------------------------------------------
# Masked statistics: means and variances over real positions only
# ---------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is set.

    values: (B, T); mask: (B, T). ``dim=None`` averages over every real position (a scalar);
    ``dim=1`` gives one mean per row, (B,).
    """
    mask = mask.to(values.dtype)
    # torch.where rather than values * mask: padding may hold NaN or inf, and NaN * 0 is NaN.
    kept = torch.where(mask > 0, values, torch.zeros_like(values))
    if dim is None:
        return kept.sum() / mask.sum()
    return kept.sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the real positions (a scalar).

    ``unbiased=True`` applies Bessel's correction n / (n - 1), with n the number of real positions.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        if n < 2:
            raise ValueError("an unbiased variance needs at least two real positions")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``values`` to zero mean and unit variance over the real positions.

    values: (B, T) -> (B, T), zero outside the mask.

    ``shift_mean=False`` rescales only and adds the mean back, which keeps the sign of the signal:
    the N-implementation-details recipe whitens *rewards* this way, and whitens *advantages* with
    the default ``shift_mean=True`` (advantage normalisation).
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------
# Generalised advantage estimation (Schulman et al. 2016)
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    dones: torch.Tensor | None = None,
    last_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and value targets.

        delta_t = r_t + gamma * V(s_{t+1}) * c_t - V(s_t)
        A_t     = delta_t + gamma * lam * c_t * A_{t+1}
        R_t     = A_t + V(s_t)                       (the value head's regression target)

    where c_t = 1 when step t continues into step t+1 and 0 when the episode ends at t
    (nothing is bootstrapped across an episode boundary).

    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T), zero outside the mask.

    Language-model case (``dones`` and ``last_values`` left out): each row is one response, the
    mask marks its tokens (it may start after a padded prompt and rows may differ in length, but
    it is contiguous within a row). The response ends at its last real token: c_t = mask_{t+1}.

    Gym case: (B, T) = (environments, rollout steps). ``dones`` (B, T) is True where the episode
    ended at step t, so step t+1 starts a fresh one. ``last_values`` (B,) is V of the observation
    after the final step T-1, which bootstraps rows whose episode is still running when the
    rollout stops.
    """
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    continues = torch.ones_like(rewards)  # (B, T): c_t before the mask is taken into account
    if dones is not None:
        continues = continues * (1.0 - dones.to(rewards.dtype))

    advantages = torch.zeros_like(rewards)  # (B, T)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,): A_{t+1}
    for t in reversed(range(T)):
        if t + 1 < T:
            next_value = values[:, t + 1]  # (B,)
            next_is_real = mask[:, t + 1]  # (B,): a padded next step means the sequence ended at t
        elif last_values is not None:
            next_value = last_values
            next_is_real = torch.ones_like(next_value)
        else:
            next_value = torch.zeros_like(values[:, t])
            next_is_real = torch.zeros_like(next_value)
        c = continues[:, t] * next_is_real  # (B,)
        # torch.where keeps garbage in padded next values (NaN, inf) from leaking in via 0 * NaN.
        next_value = torch.where(c > 0, next_value, torch.zeros_like(next_value))
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * c * next_advantage  # (B,)
        advantage = torch.where(mask[:, t] > 0, advantage, torch.zeros_like(advantage))
        advantages[:, t] = advantage
        next_advantage = advantage
    returns = torch.where(mask > 0, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# The clipped losses (Schulman et al. 2017)
# ---------------------------------------------------------------------------------------------


def clip_fraction(ratio: torch.Tensor, mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Fraction of real positions whose ratio pi_new / pi_old left [1 - eps, 1 + eps].

    The usual diagnostic of how far one round of updates moved the policy (cleanrl's ``clipfrac``).
    """
    outside = ((ratio - 1.0).abs() > clip_range).to(ratio.dtype)
    return masked_mean(outside, mask)


KL_ESTIMATORS = ("k1", "k2", "k3")  # the names ``kl_estimate`` accepts


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-sample estimate of KL(pi || pi_ref) from actions sampled from pi (J. Schulman,
    "Approximating KL Divergence"). The course's one KL function.

    Argument order: ``logprobs`` = log pi(a), the distribution the actions were *sampled from*;
    ``ref_logprobs`` = log pi_ref(a), the one it is compared with. With r = pi_ref(a) / pi(a):

    - ``"k1"``: -log r = log pi - log pi_ref. Unbiased, high variance, negative for some samples.
    - ``"k2"``: (log r)^2 / 2. Biased (slightly, while pi stays near pi_ref), low variance, >= 0.
    - ``"k3"``: (r - 1) - log r. Unbiased and never negative.

    The course uses it twice, each time with the sampling distribution first:

    - the RLHF penalty, KL(pi_theta || pi_ref) on responses sampled from pi_theta:
      ``kl_estimate(logprobs, ref_logprobs, "k1")`` per response token;
    - PPO's ``approx_kl`` diagnostic, KL(pi_old || pi_new) on a rollout sampled from pi_old:
      ``masked_mean(kl_estimate(old_logprobs, new_logprobs, "k3"), mask)``.

    logprobs, ref_logprobs: (B, T), or any shape -> the same shape (average with ``masked_mean``).
    """
    log_r = ref_logprobs - logprobs  # (B, T): log pi_ref(a) / pi(a)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # expm1 is exact for small log r
    raise ValueError(f"unknown KL estimator {estimator!r}: use one of {', '.join(KL_ESTIMATORS)}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, as a loss to minimise.

        ratio_t = pi_new(a_t | s_t) / pi_old(a_t | s_t)
        loss    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

    The max of the two negated terms is the min of the surrogates: the pessimistic bound, so moving
    the ratio beyond the trust region [1 - eps, 1 + eps] earns nothing and gets no gradient.

    logprobs (with gradient), old_logprobs, advantages, mask: (B, T). Returns (loss, stats); stats:
    ``clipfrac`` (ratio outside the range), ``clip_active_frac`` (the clipped term was the larger
    loss, so that position's gradient is zero), ``approx_kl`` (k3 estimate of KL(pi_old || pi_new),
    how far the update moved the policy), ``ratio_mean``; all detached.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": clip_fraction(ratio, mask, clip_range),
            "clip_active_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask),  # sampled from pi_old
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value-head regression to the GAE returns, optionally clipped around the rollout's values.

        V_clipped = V_old + clip(V - V_old, -eps_v, eps_v)
        loss      = 0.5 * mean_t max((V - R)^2, (V_clipped - R)^2)

    Clipping mirrors the policy's trust region (the "37 details" paper finds it optional);
    ``clip_range_value=None`` gives the plain loss 0.5 * mean (V - R)^2.

    values (with gradient), old_values, returns, mask: (B, T). Returns (loss, stats); stats:
    ``vf_clipfrac`` (fraction of positions where the clipped error was the larger one).
    """
    unclipped = (values - returns) ** 2  # (B, T)
    if clip_range_value is None:
        loss = 0.5 * masked_mean(unclipped, mask)
        return loss, {"vf_clipfrac": torch.zeros((), dtype=values.dtype)}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits) over the last dimension.

    logits: (..., V) -> (...). H = -sum_a p(a) log p(a), with log p = logits - logsumexp(logits)
    (log_softmax), which never exponentiates a large logit. Logits of -inf (forbidden actions)
    contribute zero.
    """
    log_probs = torch.log_softmax(logits, dim=-1)  # (..., V)
    probs = log_probs.exp()
    # 0 * log 0 is 0 by convention; torch.where keeps -inf out of both the value and the gradient.
    safe_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return -(probs * safe_log_probs).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """1 - Var[R - V] / Var[R] over the real positions.

    1 means the value head predicts the returns perfectly, 0 means it is no better than a constant,
    negative means worse than a constant. NaN when the returns do not vary.
    """
    if mask is None:
        mask = torch.ones_like(returns)
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns)


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers for the penalty beta * KL(pi || pi_ref) (Ziegler et al. 2019)
# ---------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt: the coefficient stays fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), a proportional controller.

        error = clip(KL_current / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + error * n_steps / horizon)

    KL above target raises beta (pulling the policy back toward pi_ref), below target lowers it.
    The clip bounds how fast beta can move; ``horizon`` (in samples) sets the time scale: one
    update of ``n_steps`` samples changes beta by at most a factor 1 +- 0.2 * n_steps / horizon.
    n_steps / horizon is the paper's K_beta (0.1 there). So the horizon must be set relative to the
    samples per update: 10,000 samples with 64 per update is K_beta = 0.0064, and beta moves by at
    most 4% in 30 updates (inert). The language-model loop's default is 10 updates' samples
    (K_beta = 0.1): beta can grow x1.81 or shrink x0.55 in 30 updates (``rlhf.PPOConfig.kl_horizon``).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust beta after a batch of ``n_steps`` samples whose mean KL was ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
