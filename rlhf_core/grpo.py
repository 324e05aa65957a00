"""Dropping the critic: advantages from several samples of one prompt (chapter 08).

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
  W. Kool, H. van Hoof, M. Welling, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019;
  brought to RLHF by A. Ahmadian, C. Cremer, M. Gallé, M. Fadaee, J. Kreutzer, O. Pietquin,
  A. Üstün, S. Hooker, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs", ACL 2024, arXiv:2402.14740.
- **GRPO**, Group Relative Policy Optimization: A_i = (r_i - mean(r)) / (std(r) + eps), the score
  standardised within its group (here with the unbiased std, as ``torch.std`` computes it, and
  eps = 1e-4 so that a group of equal scores gets 0, not 0 / 0). Z. Shao, P. Wang, Q. Zhu, R. Xu,
  J. Song, X. Bi, H. Zhang, M. Zhang, Y. K. Li, Y. Wu, D. Guo, "DeepSeekMath: Pushing the Limits of
  Mathematical Reasoning in Open Language Models", 2024, arXiv:2402.03300.
- **Dr. GRPO**, "GRPO done right": A_i = r_i - mean(r). Dividing by std(r) weights prompts
  unevenly: a group whose scores barely differ (a prompt that is too easy or too hard) has its
  small differences blown up to unit scale. Dr. GRPO drops the division (and, in the loss, GRPO's
  division of each response's token sum by its own length, which penalises a long wrong answer
  less per token than a short one).
  Z. Liu, C. Chen, W. Li, P. Qi, T. Pang, C. Du, W. S. Lee, M. Lin, "Understanding R1-Zero-Like
  Training: A Critical Perspective", 2025, arXiv:2503.20783.

Layout: the P prompts of a batch each get k samples, stored as consecutive rows, so the scores are
one flat (P * k,) tensor where entries i*k ... i*k + k - 1 belong to prompt i, and
``scores.view(P, k)`` has one row per prompt.

**The critic-free loop** (``critic_free_iteration``) is chapter 04's PPO iteration with the value
model taken out. Three models: the policy pi_theta (trained), the reference pi_ref and the reward
model r_phi (both frozen). Each step is a function defined above the iteration, in this order:

1. **Rollout** (``rlhf.rollout``): each of the P prompts k times, on consecutive rows.
2. **Score** (``score``): log pi_theta and log pi_ref of every response token at the sampling
   temperature, the reward model's score at the last real token minus the missing-EOS penalty.
   No values.
3. **Sequence rewards** (``sequence_rewards``): one number per response, the penalised score, minus
   beta times the response's summed k1 KL when the KL is in the reward (``kl_in="reward"``, as PPO
   and RLOO do it).
4. **Group advantages** (``group_advantages``): one per response, compared with its k - 1 siblings,
   then given to every token of the response.
5. **Update epochs** (``update_epochs``): PPO's clipped objective, ``ppo.policy_loss`` itself, over a
   few epochs of shuffled minibatches; with ``kl_in="loss"`` the k3 estimate of KL(pi_theta || pi_ref)
   is added to the loss (GRPO's way). How the per-token losses are averaged is the
   ``loss_aggregation`` (``token_weights``): per response, divided by its length, then over responses
   (GRPO); over all tokens of the batch (RLOO here, as PPO); divided by a constant, the batch's
   responses times ``max_new_tokens`` (Dr. GRPO, which shows that dividing by each response's own
   length biases the length a policy learns).

The paper's RLOO is plain REINFORCE: one gradient step per batch, no ratio, no clipping. The course
runs it through the same clipped objective over ``ppo_epochs`` epochs; ``ppo_epochs=1`` with
``minibatch_size`` = P * k gives the paper's form (the ratio is 1 at the single step, so clipping
never acts and the gradient is REINFORCE's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import ppo
from .config import Profile, get_profile, with_overrides
from .errors import CourseError
from .generation import Generation
from .gold import gold_scores
from .logprobs import forward_logits, response_logprobs, token_logprobs_from_logits
from .models import disable_dropout
from .rlhf import PPOConfig, rollout, token_entropy
from .training import InterruptGuard, check_finite, load_checkpoint, save_checkpoint

__all__ = [
    "ADVANTAGE_METHODS",
    "GRPO_STD_EPS",
    "group_advantages",
    "KL_PLACEMENTS",
    "LOSS_AGGREGATIONS",
    "METHOD_DEFAULTS",
    "CriticFreeConfig",
    "CriticFreeModels",
    "CriticFreeState",
    "GroupScores",
    "GroupRollout",
    "repeat_prompts",
    "score",
    "sequence_rewards",
    "token_weights",
    "critic_free_loss",
    "update_epochs",
    "critic_free_iteration",
    "CriticFreeTrainer",
    "policy_gradient",
    "GradientMoments",
    "training_memory",
]

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


# ----- the configuration ---------------------------------------------------------------------------
KL_PLACEMENTS = ("reward", "loss")  # where beta * KL(pi || pi_ref) enters: the sequence reward, or the loss
LOSS_AGGREGATIONS = ("sequence", "token", "constant")  # how per-token losses become one number (``token_weights``)
GROUP_SIZE = 4  # k, the default samples per prompt

# Each method's published choices; the rest of the defaults are PPO's, so that the frontier compares.
METHOD_DEFAULTS = {
    # Shao et al. 2024, eq. 3: k3 KL in the loss, each response's token mean, then the mean over responses
    "grpo": {"kl_in": "loss", "loss_aggregation": "sequence"},
    # Liu et al. 2025: GRPO without the std division (``group_advantages``) nor the per-response length
    # division: token sums over a constant, the responses times max_new_tokens. The KL stays in the loss.
    "dr_grpo": {"kl_in": "loss", "loss_aggregation": "constant"},
    # Ahmadian et al. 2024: the KL in the reward, as PPO does; every token of the batch weighs the same
    "rloo": {"kl_in": "reward", "loss_aggregation": "token"},
}


@dataclass
class CriticFreeConfig:
    method: str = "grpo"  # advantage estimator (``group_advantages``): "grpo", "dr_grpo" or "rloo"
    iterations: int = 30  # rollout + update rounds
    prompts_per_iteration: int = 16  # P: prompts drawn per iteration; P * k responses are sampled
    group_size: int = GROUP_SIZE  # k: responses per prompt, the group each is compared with
    minibatch_size: int = 16  # responses per gradient step
    ppo_epochs: int = 4  # passes over each rollout (sample reuse, kept safe by clipping); 0: no update
    learning_rate: float = 3e-4  # AdamW for the policy (PPO's policy learning rate)
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same one
    max_new_tokens: int = 64  # responses longer than this are cut and count as "no EOS"
    kl_coef: float = 0.05  # beta: weight of KL(pi_theta || pi_ref), in the reward or in the loss
    kl_in: str = "loss"  # "reward": -beta * summed k1 KL in each response's reward; "loss": beta * k3 in the loss
    loss_aggregation: str = "sequence"  # "sequence" (GRPO), "token" (PPO, RLOO) or "constant" (Dr. GRPO)
    clip_range: float = 0.2  # policy ratio trust region [1 - eps, 1 + eps]
    max_grad_norm: float = 1.0  # gradient clipping of the policy
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ended
    sample_every: int = 5  # iterations between logged sample responses (0: none)
    checkpoint_every: int = 10  # iterations between resumable checkpoints (0: only at the end)
    seed: int = 0  # prompt draws, sampling and minibatch shuffles

    def __post_init__(self):
        choices = {"method": ADVANTAGE_METHODS, "kl_in": KL_PLACEMENTS, "loss_aggregation": LOSS_AGGREGATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CourseError(f"CriticFreeConfig {name}={getattr(self, name)!r} is unknown: use one of "
                                  f"{', '.join(allowed)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise CourseError(f"CriticFreeConfig group_size={self.group_size!r}: a baseline from a prompt's other "
                              "samples needs at least 2 samples per prompt; set group_size >= 2")
        for name in ("iterations", "prompts_per_iteration", "minibatch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise CourseError(f"CriticFreeConfig {name}={getattr(self, name)} must be at least 1")
        for name in ("ppo_epochs", "kl_coef", "missing_eos_penalty", "sample_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise CourseError(f"CriticFreeConfig {name}={getattr(self, name)} must not be negative")
        for name in ("learning_rate", "temperature", "clip_range", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise CourseError(f"CriticFreeConfig {name}={getattr(self, name)} must be positive")

    @property
    def responses_per_iteration(self) -> int:
        """P * k: the rollout's size, PPO's ``prompts_per_iteration`` with the defaults."""
        return self.prompts_per_iteration * self.group_size

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, method: str = "grpo", **overrides) -> CriticFreeConfig:
        """``method``'s published choices (``METHOD_DEFAULTS``) on top of the profile's PPO defaults:
        the same iterations, learning rate, beta, epochs, minibatch, clipping and response length, and
        P * k = PPO's responses per iteration (k = 4), so the three methods and PPO spend the same
        samples and compare on one frontier."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        if method not in METHOD_DEFAULTS:
            raise CourseError(f"CriticFreeConfig method={method!r} is unknown: use one of {', '.join(METHOD_DEFAULTS)}")
        ppo_defaults = PPOConfig.for_profile(profile)
        defaults = dict(
            method=method,
            **METHOD_DEFAULTS[method],
            iterations=ppo_defaults.iterations,
            prompts_per_iteration=ppo_defaults.prompts_per_iteration // GROUP_SIZE,
            group_size=GROUP_SIZE,
            minibatch_size=ppo_defaults.minibatch_size,
            ppo_epochs=ppo_defaults.ppo_epochs,
            learning_rate=ppo_defaults.policy_learning_rate,
            temperature=ppo_defaults.temperature,
            max_new_tokens=ppo_defaults.max_new_tokens,
            kl_coef=ppo_defaults.kl_coef,
            clip_range=ppo_defaults.clip_range,
            max_grad_norm=ppo_defaults.max_grad_norm,
            missing_eos_penalty=ppo_defaults.missing_eos_penalty,
            sample_every=ppo_defaults.sample_every,
            checkpoint_every=ppo_defaults.checkpoint_every,
            seed=ppo_defaults.seed,
        )
        return with_overrides(cls(**defaults), overrides)


# ----- the models and the loop's state ---------------------------------------------------------------
@dataclass
class CriticFreeModels:
    """The three models of the critic-free loop (PPO's four, less the value model)."""

    policy: nn.Module  # pi_theta: causal LM initialised from SFT, trained
    reference: nn.Module  # pi_ref: the frozen SFT model the KL anchors to
    reward_model: nn.Module  # r_phi: frozen, read by ``score_fn``
    tokenizer: object  # encodes the prompts, decodes the responses
    score_fn: Callable  # (reward_model, input_ids, attention_mask) -> (B,) normalised scores


@dataclass
class CriticFreeState:
    """What one iteration changes besides the weights, carried from one iteration to the next."""

    optimizer: torch.optim.Optimizer  # AdamW over the policy's parameters (the only trained model)
    shuffle_generator: torch.Generator  # CPU: prompt draws and minibatch order
    sampling_generator: torch.Generator  # on the policy's device: token sampling
    iteration: int = 0  # iterations done


# ----- the steps of one iteration, in order ----------------------------------------------------------
def repeat_prompts(prompts: list[str], group_size: int) -> list[str]:
    """Step 1's input: each prompt ``group_size`` times on consecutive rows, [a, a, b, b] for k = 2,
    the layout ``group_advantages`` reads."""
    return [prompt for prompt in prompts for _ in range(group_size)]


@dataclass
class GroupScores:
    """Step 2's readings of one sampled batch of P * k responses, (B, T) aligned with the tokens."""

    logprobs: torch.Tensor  # (B, T) log pi_theta_old of each response token (0 elsewhere)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref of each response token
    reward_model_scores: torch.Tensor  # (B,) the reward model's score (normalised), what measure_policy reports
    penalised_scores: torch.Tensor  # (B,) reward_model_scores minus the missing-EOS penalty


@torch.no_grad()
def score(models: CriticFreeModels, batch: Generation, config: CriticFreeConfig, iteration: int = 0) -> GroupScores:
    """Step 2: log-probs under the policy and the reference at the sampling temperature, and the reward
    model's score at the last real token, penalised when the response never produced EOS. It is
    ``rlhf.score`` without the values: nothing here needs a critic. ``iteration`` names the iteration
    in the error raised for a NaN score."""
    sampled = (batch.input_ids, batch.attention_mask, batch.response_mask)
    logprobs = response_logprobs(models.policy, *sampled, temperature=config.temperature)  # (B, T)
    ref_logprobs = response_logprobs(models.reference, *sampled, temperature=config.temperature)  # (B, T)
    reward_model_scores = models.score_fn(models.reward_model, batch.input_ids, batch.attention_mask).float()  # (B,)
    check_finite(reward_model_scores.sum(), "reward-model score", iteration, "iteration")
    penalised_scores = reward_model_scores - config.missing_eos_penalty * (~batch.ended).float()  # (B,)
    return GroupScores(logprobs, ref_logprobs, reward_model_scores, penalised_scores)


def sequence_rewards(penalised_scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, kl_in: str) -> torch.Tensor:
    """Step 3: one reward per response. With ``kl_in="reward"`` the penalised score minus beta times
    the response's summed per-token KL (PPO's penalty, summed over the response instead of spread over
    its tokens: there is no critic to spread it for); with ``kl_in="loss"`` the penalised score alone
    (the KL enters the loss, ``critic_free_loss``).

    penalised_scores (B,), kl (B, T) per-token k1 estimates, 0 on padding -> (B,)."""
    if kl_in == "reward":
        return penalised_scores - kl_coef * kl.sum(-1)
    return penalised_scores


@dataclass
class GroupRollout(GroupScores):
    """Everything one iteration's update needs: the sampled batch, its ``GroupScores`` (step 2), and
    steps 3-4. (B, T) aligned with the tokens, B = P * k."""

    batch: Generation  # ids, attention mask, response mask, prompts (each k times), decoded responses
    kl: torch.Tensor  # (B, T) per-token k1 estimate of KL(pi_theta || pi_ref), 0 on padding
    rewards: torch.Tensor  # (B,) step 3's sequence rewards, what the group advantages compare
    advantages: torch.Tensor  # (B, T) each response's group advantage on every one of its tokens, 0 on padding


def token_weights(response_mask: torch.Tensor, loss_aggregation: str, max_new_tokens: int) -> torch.Tensor:
    """The weight w_{i,t} of each token's loss in the minibatch's loss, sum_{i,t} w_{i,t} * loss_{i,t}.

    With B responses of lengths |y_i| and N = sum_i |y_i| real tokens:

    - ``"token"``:    w = 1 / N                 every token of the batch weighs the same (PPO, RLOO)
    - ``"sequence"``: w = 1 / (B * |y_i|)       each response's token mean, then the mean over responses
                                                 (GRPO): a token of a short response weighs more
    - ``"constant"``: w = 1 / (B * max_new_tokens)  token sums over a constant (Dr. GRPO): every token
                                                 weighs the same whatever its response's length

    response_mask (B, T) -> weights (B, T), 0 on padding."""
    mask = response_mask if response_mask.is_floating_point() else response_mask.float()  # (B, T)
    n_responses = mask.shape[0]
    if loss_aggregation == "token":
        return mask / mask.sum()
    if loss_aggregation == "sequence":
        lengths = mask.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1): every sampled response has a token
        return mask / (n_responses * lengths)
    if loss_aggregation == "constant":
        return mask / (n_responses * max_new_tokens)
    raise CourseError(f"token_weights: unknown loss_aggregation {loss_aggregation!r}; use one of "
                      f"{', '.join(LOSS_AGGREGATIONS)}")


def critic_free_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     advantages: torch.Tensor, response_mask: torch.Tensor,
                     config: CriticFreeConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one minibatch: PPO's clipped objective aggregated with ``token_weights``, plus
    beta * k3 KL(pi_theta || pi_ref) with the same weights when ``config.kl_in == "loss"``:

        loss = sum_{i,t} w_{i,t} max(-A_i ratio_{i,t}, -A_i clip(ratio_{i,t}, 1 - eps, 1 + eps))
             [+ beta * sum_{i,t} w_{i,t} k3_{i,t}]

    The clipped term is ``ppo.policy_loss`` itself, which averages over the mask's N tokens. Each
    token's term is positively homogeneous in its advantage (for c > 0, max(-cA r, -cA clip(r)) =
    c max(-A r, -A clip(r)), and the clipping decision depends on the sign of A only), so handing it
    the advantages A_{i,t} * w_{i,t} * N turns its plain token mean into the weighted sum above.

    logprobs (with gradient), old_logprobs, ref_logprobs, advantages, response_mask: (B, T).
    Returns (loss, stats); stats: ``policy_loss`` (the clipped term), ``kl_loss`` (the weighted k3
    KL, whether or not it is in the loss), and ``policy_loss``'s ``clipfrac``, ``approx_kl``, ... (token
    means); all detached."""
    mask = response_mask.to(logprobs.dtype)  # (B, T)
    weights = token_weights(mask, config.loss_aggregation, config.max_new_tokens)  # (B, T)
    n_tokens = mask.sum()
    # torch.where: whatever padding holds (NaN, inf) stays out of the loss and of its gradient
    weighted_advantages = torch.where(mask > 0, advantages * weights * n_tokens, torch.zeros_like(advantages))
    clipped_loss, stats = ppo.policy_loss(logprobs, old_logprobs, weighted_advantages, mask, config.clip_range)
    k3 = ppo.kl_estimate(logprobs, ref_logprobs, "k3")  # (B, T): samples come from pi_theta (old), pi_ref compared
    kl_loss = torch.where(mask > 0, k3 * weights, torch.zeros_like(k3)).sum()
    loss = clipped_loss + config.kl_coef * kl_loss if config.kl_in == "loss" else clipped_loss
    stats = {**stats, "policy_loss": clipped_loss.detach(), "kl_loss": kl_loss.detach()}
    return loss, stats


def update_epochs(policy: nn.Module, optimizer: torch.optim.Optimizer, data: GroupRollout, config: CriticFreeConfig,
                  generator: torch.Generator | None, iteration: int) -> dict[str, float]:
    """Step 5: ``ppo_epochs`` passes over the rollout in shuffled minibatches, each a gradient step on
    ``critic_free_loss``; returns the statistics averaged over the steps (none with 0 epochs)."""
    size = len(data.batch)
    sums: dict[str, float] = {}
    steps = 0
    policy.train()  # dropout is off: train() only matters to modules that check it
    for _ in range(config.ppo_epochs):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, config.minibatch_size):
            rows = order[start:start + config.minibatch_size]
            input_ids, attention_mask = data.batch.input_ids[rows], data.batch.attention_mask[rows]
            response_mask = data.batch.response_mask[rows]  # (b, T)
            logits = forward_logits(policy, input_ids, attention_mask)  # (b, T, V)
            logprobs = token_logprobs_from_logits(logits, input_ids, config.temperature) * response_mask  # (b, T)
            loss, stats = critic_free_loss(logprobs, data.logprobs[rows], data.ref_logprobs[rows],
                                           data.advantages[rows], response_mask, config)
            check_finite(loss, "critic-free loss", iteration, "iteration")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(policy.parameters()), config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                entropy = ppo.masked_mean(token_entropy(logits, config.temperature), response_mask.float())
            logged = {"policy_loss": stats["policy_loss"], "entropy": entropy, "clipfrac": stats["clipfrac"],
                      "approx_kl": stats["approx_kl"]}
            if config.kl_in == "loss":
                logged["kl_loss"] = stats["kl_loss"]
            for name, value in logged.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            steps += 1
    policy.eval()
    return {name: total / steps for name, total in sums.items()}


# ----- one iteration ---------------------------------------------------------------------------------
def critic_free_iteration(models: CriticFreeModels, prompts: list[str], config: CriticFreeConfig,
                          state: CriticFreeState) -> tuple[dict[str, float], GroupRollout]:
    """One critic-free iteration on P prompts: the five steps of the module docstring.

    Trains the policy in place and advances ``state``; returns the iteration's record (its keys are
    explained in ``CriticFreeTrainer``) and the rollout it used."""
    iteration = state.iteration + 1
    started = time.perf_counter()

    # 1. rollout: k samples of each prompt, on consecutive rows
    batch = rollout(models.policy, models.tokenizer, repeat_prompts(prompts, config.group_size), config,
                    state.sampling_generator)
    response_mask = batch.response_mask.float()  # (B, T), B = P * k
    generated = time.perf_counter()

    # 2. score (no values: there is no critic)
    scores = score(models, batch, config, iteration)
    # 3. sequence rewards
    kl = ppo.kl_estimate(scores.logprobs, scores.ref_logprobs, "k1") * response_mask  # (B, T)
    rewards = sequence_rewards(scores.penalised_scores, kl, config.kl_coef, config.kl_in)  # (B,)
    # 4. group advantages, one per response, on every one of its tokens
    advantages = group_advantages(rewards, config.group_size, config.method)  # (B,)
    token_advantages = advantages[:, None] * response_mask  # (B, T)
    data = GroupRollout(**vars(scores), batch=batch, kl=kl, rewards=rewards, advantages=token_advantages)
    scored = time.perf_counter()

    # 5. update epochs
    update = update_epochs(models.policy, state.optimizer, data, config, state.shuffle_generator, iteration)
    trained = time.perf_counter()

    golds = gold_scores(batch.prompts, batch.responses, batch.ended.tolist())  # the learner's view only
    record = {
        "iteration": iteration,
        "reward_model_score": float(scores.reward_model_scores.mean()),
        "penalised_score": float(scores.penalised_scores.mean()),
        "gold": float(golds.mean()),
        "kl": float(kl.sum(-1).mean()),
        "kl_coef": config.kl_coef,
        "length": float(batch.response_lengths.float().mean()),
        "eos_fraction": float(batch.ended.float().mean()),
        "advantage_std": float(advantages.std()),
        **update,
        "seconds_generate": generated - started,
        "seconds_score": scored - generated,
        "seconds_train": trained - scored,
    }
    check_finite(record["kl"], "KL to the reference", iteration, "iteration")
    state.iteration = iteration
    return record, data


# ----- the trainer: state, history, checkpoints ------------------------------------------------------
@dataclass
class CriticFreeTrainer:
    """The three models, the policy's optimiser and the loop's state; ``step`` runs one
    ``critic_free_iteration``, ``train`` runs them all with checkpoints.

    Logged per iteration (``history``, one dict each; the keys PPO logs mean the same here):
      reward_model_score  mean reward-model score of the rollout (normalised: the SFT policy scores 0 +- 1)
      penalised_score     mean of that score minus ``missing_eos_penalty`` for each response without EOS
      gold          mean gold score of the same responses (the hidden human; never used in training)
      kl            mean summed KL(pi_theta || pi_ref) per response, in nats (k1)
      kl_coef       beta (in the reward or in the loss, as ``config.kl_in`` says)
      length        mean response length in tokens (EOS included); eos_fraction: share that ended
      advantage_std spread of the P * k group advantages (about 1 for GRPO; the scores' scale otherwise)
      policy_loss   the clipped term of the loss; kl_loss: the weighted k3 KL term (``kl_in="loss"`` only)
      clipfrac      share of tokens whose ratio left [1 - eps, 1 + eps] during the update
      approx_kl     k3 estimate of KL(pi_old || pi_new): how far one update moved the policy
      entropy       mean per-token entropy of the policy at the sampling temperature
      seconds_generate / seconds_score / seconds_train: where the time goes
    ``samples`` holds the first response of every ``sample_every``-th iteration with its scores.
    """

    policy: nn.Module
    reference: nn.Module
    reward_model: nn.Module
    tokenizer: object
    prompts: list[str]
    config: CriticFreeConfig
    score_fn: Callable  # (reward_model, input_ids, attention_mask) -> (B,) normalised scores
    history: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    def __post_init__(self):
        for model in (self.policy, self.reference, self.reward_model):
            disable_dropout(model)
        for frozen in (self.reference, self.reward_model):
            frozen.eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(list(self.policy.parameters()), lr=self.config.learning_rate, eps=1e-5,
                                      weight_decay=0.0)
        device = next(self.policy.parameters()).device  # token sampling draws on the policy's device
        self.state = CriticFreeState(
            optimizer,
            shuffle_generator=torch.Generator().manual_seed(self.config.seed),
            sampling_generator=torch.Generator(device=device).manual_seed(self.config.seed + 1),
        )

    @property
    def models(self) -> CriticFreeModels:
        return CriticFreeModels(self.policy, self.reference, self.reward_model, self.tokenizer, self.score_fn)

    @property
    def iteration(self) -> int:
        """Iterations done."""
        return self.state.iteration

    def step(self) -> dict[str, float]:
        """One iteration on P freshly drawn prompts; appends to ``history`` and returns the record."""
        rows = torch.randint(len(self.prompts), (self.config.prompts_per_iteration,),
                             generator=self.state.shuffle_generator)
        record, data = critic_free_iteration(self.models, [self.prompts[i] for i in rows.tolist()], self.config,
                                             self.state)
        self.history.append(record)
        every = self.config.sample_every
        if every and (record["iteration"] - 1) % every == 0:
            batch = data.batch
            gold = gold_scores(batch.prompts[:1], batch.responses[:1], batch.ended[:1].tolist())
            self.samples.append({"iteration": record["iteration"], "prompt": batch.prompts[0],
                                 "response": batch.responses[0],
                                 "reward_model_score": float(data.reward_model_scores[0]),
                                 "penalised_score": float(data.penalised_scores[0]),
                                 "advantage": float(data.advantages[0].sum() / data.batch.response_mask[0].sum()),
                                 "gold": float(gold[0])})
        return record

    def train(self, iterations: int | None = None, checkpoint_dir: str | Path | None = None, resume: bool = True,
              callback: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
        """Run until ``iterations`` (default: the config's) are done; returns the history.

        With a ``checkpoint_dir``, a checkpoint is saved every ``checkpoint_every`` iterations and at
        the end, and (``resume=True``) a checkpoint found there is continued, to the same result as a
        run never stopped. Ctrl-C finishes the current iteration, saves, says where the next run
        resumes and re-raises KeyboardInterrupt (a second Ctrl-C stops at once, unsaved).
        ``callback`` gets each iteration's record (live plots)."""
        total = iterations or self.config.iterations
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if folder is not None and resume and (folder / "training_state.pt").exists():
            self.load(folder)
        every = self.config.checkpoint_every
        bar = tqdm(total=total, initial=self.iteration, desc=self.config.method, disable=not progress)
        with InterruptGuard() as interrupt:
            try:
                while self.iteration < total:
                    interrupt.busy = True
                    record = self.step()
                    if folder is not None and every and self.iteration % every == 0:
                        self.save(folder)
                    interrupt.busy = False
                    bar.update(1)
                    bar.set_postfix(score=f"{record['reward_model_score']:+.2f}", gold=f"{record['gold']:+.2f}",
                                    kl=f"{record['kl']:.2f}")
                    if callback is not None:
                        callback(record)
                    if interrupt.requested:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                bar.close()
                print(self._stop_after_interrupt(folder, inside_iteration=interrupt.busy))
                raise
        bar.close()
        if folder is not None:
            self.save(folder)
        return self.history

    def _stop_after_interrupt(self, folder: Path | None, inside_iteration: bool) -> str:
        """Save what can be saved after Ctrl-C; the one line that says where the next run resumes."""
        if inside_iteration:  # half an update: the weights belong to no iteration, nothing to save
            where = f"the last checkpoint in {folder}" if folder is not None else "scratch (no checkpoint_dir)"
            return (f"interrupted inside iteration {self.iteration + 1}, nothing saved: "
                    f"the next run resumes from {where}")
        if folder is None:
            return f"interrupted at iteration {self.iteration}, nothing saved (no checkpoint_dir)"
        self.save(folder)
        return f"interrupted at iteration {self.iteration}, the next run resumes from {folder}"

    # ----- checkpoints -------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """The policy (a loadable ``save_pretrained`` folder), optimiser, random states and history
        through ``save_checkpoint``; the sampling generator and samples in its ``extra``: one atomic
        write of everything ``load`` needs to continue exactly."""
        extra = {"sampling_rng": self.state.sampling_generator.get_state(), "samples": json.dumps(self.samples),
                 "config": json.dumps(asdict(self.config))}
        return save_checkpoint(folder, self.policy, self.state.optimizer, self.iteration, self.history,
                               self.state.shuffle_generator, extra)

    def load(self, folder: str | Path) -> None:
        restored = load_checkpoint(folder, self.policy, self.state.optimizer, self.state.shuffle_generator)
        extra = restored["extra"]
        saved_config = json.loads(extra["config"])
        if saved_config != asdict(self.config):
            changed = sorted(name for name, value in asdict(self.config).items() if saved_config.get(name) != value)
            raise CourseError(f"the checkpoint in {folder} was written with another config ({', '.join(changed)} "
                              "differ): resume with the same config, or pass resume=False to start over")
        self.state.sampling_generator.set_state(extra["sampling_rng"])
        self.state.iteration = restored["step"]
        self.history = restored["history"]
        self.samples = json.loads(extra["samples"])


# ----- measuring what the baseline buys: gradient noise, memory --------------------------------------
def policy_gradient(policy: nn.Module, batch: Generation, advantages: torch.Tensor, temperature: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """The policy gradient of one rollout at the policy that sampled it, flattened to one vector:

        g = -grad_theta sum_{i,t} w_{i,t} A_{i,t} log pi_theta(y_{i,t} | x_i, y_{i,<t})

    the gradient of the first step of every loop of the course (PPO's ratio is 1 there, so its
    clipped loss has exactly this gradient). advantages (B, T); ``weights`` (B, T), by default
    ``token_weights(..., "token")``: the same averaging for every estimator, so only the advantages differ.
    Leaves the policy's ``.grad`` empty."""
    input_ids, attention_mask, response_mask = batch.input_ids, batch.attention_mask, batch.response_mask
    if weights is None:
        weights = token_weights(response_mask, "token", 1)
    logits = forward_logits(policy, input_ids, attention_mask)  # (B, T, V)
    logprobs = token_logprobs_from_logits(logits, input_ids, temperature) * response_mask  # (B, T)
    surrogate = -(weights * advantages.detach() * logprobs).sum()
    parameters = [p for p in policy.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(surrogate, parameters)
    return torch.cat([g.reshape(-1) for g in gradients]).detach()


class GradientMoments:
    """Running first and second moments of gradient vectors: what their noise is, in O(D) memory.

    After n >= 2 gradients g_1 ... g_n (independent draws of the same estimator):
      mean   = sum g / n                              (D,)
      noise  = sum ||g - mean||^2 / (n - 1)          the trace of the covariance, unbiased
      signal = ||mean||^2 - noise / n                ||E g||^2, unbiased (``mean`` carries noise / n)
      signal_to_noise = signal / noise               how many times the direction outweighs the noise
    """

    def __init__(self):
        self.count = 0
        self.total: torch.Tensor | None = None  # (D,) sum of the gradients, float64
        self.total_squared_norm = 0.0  # sum of ||g||^2

    def add(self, gradient: torch.Tensor) -> None:
        gradient = gradient.detach().double()
        self.total = gradient.clone() if self.total is None else self.total + gradient
        self.total_squared_norm += float(gradient.dot(gradient))
        self.count += 1

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def noise(self) -> float:
        if self.count < 2:
            raise CourseError("GradientMoments: the noise needs at least 2 gradients; add more resamples")
        n = self.count
        mean_squared_norm = float(self.mean.dot(self.mean))
        return (self.total_squared_norm - n * mean_squared_norm) / (n - 1)

    @property
    def signal(self) -> float:
        return float(self.mean.dot(self.mean)) - self.noise / self.count

    @property
    def signal_to_noise(self) -> float:
        return self.signal / self.noise


def training_memory(models: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Bytes each model holds while training, counted tensor by tensor (after a backward pass and an
    optimiser step, so that gradients and AdamW's two moments exist):

        {name: {"parameters": ..., "gradients": ..., "optimizer_state": ...}}

    A tensor shared by two models (a tied embedding, a value head on the policy's trunk) counts once,
    with the first model that holds it. Activations are not counted: they live only during a step."""
    seen: set[int] = set()
    result = {}
    for name, model in models.items():
        counts = {"parameters": 0, "gradients": 0, "optimizer_state": 0}
        for parameter in model.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            counts["parameters"] += parameter.numel() * parameter.element_size()
            if parameter.grad is not None:
                counts["gradients"] += parameter.grad.numel() * parameter.grad.element_size()
            for value in optimizer.state.get(parameter, {}).values():
                if isinstance(value, torch.Tensor):
                    counts["optimizer_state"] += value.numel() * value.element_size()
        result[name] = counts
    return result
