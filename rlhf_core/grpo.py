"""Dropping the critic (chapter 08): the critic-free loop of GRPO, Dr. GRPO and RLOO.

The critic-free loop (``critic_free_iteration``) is chapter 04's PPO iteration with the value
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

The advantages themselves (``group_advantages``: RLOO, GRPO, Dr. GRPO, with the papers) are
``rlhf_core.group_baselines``; the trainer with its checkpoints is ``rlhf_core.grpo_trainer``; chapter 08's
measurements (gradient noise, memory) are ``rlhf_core.critic_cost``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from . import distributed, ppo
from .batching import minibatch_rows, rows_and_columns, used_columns
from .config import Profile, check_bounds, get_profile, with_overrides
from .errors import CourseError
from .generation import Generation
from .gold import gold_scores
from .group_baselines import ADVANTAGE_METHODS, GRPO_STD_EPS, group_advantages  # noqa: F401 (rlhf_core.grpo's API)
from .logprobs import forward_logits, response_logprobs, token_logprobs_from_logits
from .precision import autocast
from .rlhf import PPOConfig, rollout, token_entropy
from .training import backward_and_step, check_finite

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
    length_sorted_minibatches: bool = True  # minibatches of similar response length, cut to their used columns
    seed: int = 0  # prompt draws, sampling and minibatch shuffles
    lora_rank: int = 0  # LoRA adapters of this rank on the policy, pi_ref its adapters off (0: full; rlhf_core.lora)

    def __post_init__(self):
        choices = {"method": ADVANTAGE_METHODS, "kl_in": KL_PLACEMENTS, "loss_aggregation": LOSS_AGGREGATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CourseError(
                    f"CriticFreeConfig {name}={getattr(self, name)!r} is unknown: use one of {', '.join(allowed)}"
                )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise CourseError(
                f"CriticFreeConfig group_size={self.group_size!r}: a baseline from a prompt's other "
                "samples needs at least 2 samples per prompt; set group_size >= 2"
            )
        check_bounds(
            self,
            at_least_one=("iterations", "prompts_per_iteration", "minibatch_size", "max_new_tokens"),
            not_negative=("ppo_epochs", "kl_coef", "missing_eos_penalty", "sample_every", "checkpoint_every"),
            positive=("learning_rate", "temperature", "clip_range", "max_grad_norm"),
        )

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
        ppo_defaults = PPOConfig.for_profile(profile, **{k: v for k, v in overrides.items() if k == "lora_rank"})
        shared = (
            "iterations",
            "minibatch_size",
            "ppo_epochs",
            "temperature",
            "max_new_tokens",
            "kl_coef",
            "clip_range",
            "max_grad_norm",
            "missing_eos_penalty",
            "sample_every",
            "checkpoint_every",
            "length_sorted_minibatches",
            "seed",
            "lora_rank",
        )
        defaults = {name: getattr(ppo_defaults, name) for name in shared}
        defaults.update(
            method=method,
            **METHOD_DEFAULTS[method],
            group_size=GROUP_SIZE,
            prompts_per_iteration=ppo_defaults.prompts_per_iteration // GROUP_SIZE,
            learning_rate=ppo_defaults.policy_learning_rate,
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
    precision: str = "fp32"  # resolved precision of the forward passes (``rlhf_core.precision``)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling (None or disabled: plain steps)


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
def score(
    models: CriticFreeModels, batch: Generation, config: CriticFreeConfig, iteration: int = 0, precision: str = "fp32"
) -> GroupScores:
    """Step 2: log-probs under the policy and the reference at the sampling temperature, and the reward
    model's score at the last real token, penalised when the response never produced EOS. It is
    ``rlhf.score`` without the values: nothing here needs a critic. ``iteration`` names the iteration
    in the error raised for a NaN score; the forward passes run under ``precision``'s autocast."""
    sampled = (batch.input_ids, batch.attention_mask, batch.response_mask)
    with autocast(batch.input_ids.device, precision):
        logprobs = response_logprobs(models.policy, *sampled, temperature=config.temperature)  # (B, T) float32
        ref_logprobs = response_logprobs(models.reference, *sampled, temperature=config.temperature)  # (B, T)
        reward_model_scores = models.score_fn(models.reward_model, batch.input_ids, batch.attention_mask).float()
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
    raise CourseError(
        f"token_weights: unknown loss_aggregation {loss_aggregation!r}; use one of {', '.join(LOSS_AGGREGATIONS)}"
    )


def critic_free_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: CriticFreeConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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


def update_epochs(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: GroupRollout,
    config: CriticFreeConfig,
    generator: torch.Generator | None,
    iteration: int,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Step 5: ``ppo_epochs`` passes over the rollout in minibatches (``batching.minibatch_rows``), each a
    gradient step on ``critic_free_loss``; returns the statistics averaged over the steps (none with 0 epochs)."""
    sums: dict[str, float] = {}
    steps = 0
    policy.train()  # dropout is off: train() only matters to modules that check it
    for _ in range(config.ppo_epochs):
        # as in PPO (rlhf.update_epochs): rows of similar response length, cut to the columns they use
        for rows in minibatch_rows(
            data.batch.response_mask.sum(-1), config.minibatch_size, generator, config.length_sorted_minibatches
        ):
            # (B, T) -> (b, t): this minibatch's rows, cut to the columns they use
            cut = partial(rows_and_columns, rows=rows, columns=used_columns(data.batch.attention_mask[rows]))

            input_ids, attention_mask, response_mask = map(
                cut, (data.batch.input_ids, data.batch.attention_mask, data.batch.response_mask)
            )  # (b, t) each
            with autocast(input_ids.device, precision):
                logits = forward_logits(policy, input_ids, attention_mask)  # (b, t, V)
            logprobs = token_logprobs_from_logits(logits, input_ids, config.temperature) * response_mask  # (b, t)
            loss, stats = critic_free_loss(
                logprobs, cut(data.logprobs), cut(data.ref_logprobs), cut(data.advantages), response_mask, config
            )
            check_finite(loss, "critic-free loss", iteration, "iteration")
            backward_and_step(loss, optimizer, scaler, list(policy.parameters()), config.max_grad_norm)
            with torch.no_grad():
                entropy = ppo.masked_mean(token_entropy(logits, config.temperature), response_mask.float())
            logged = {
                "policy_loss": stats["policy_loss"],
                "entropy": entropy,
                "clipfrac": stats["clipfrac"],
                "approx_kl": stats["approx_kl"],
            }
            if config.kl_in == "loss":
                logged["kl_loss"] = stats["kl_loss"]
            for name, value in logged.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            steps += 1
    policy.eval()
    return {name: total / steps for name, total in sums.items()}


# ----- one iteration ---------------------------------------------------------------------------------
def critic_free_iteration(
    models: CriticFreeModels, prompts: list[str], config: CriticFreeConfig, state: CriticFreeState
) -> tuple[dict[str, float], GroupRollout]:
    """One critic-free iteration on P prompts: the five steps of the module docstring.

    Trains the policy in place and advances ``state``; returns the iteration's record (its keys are
    explained in ``CriticFreeTrainer``) and the rollout it used. Under ``accelerate launch`` each process
    runs it on its own P / (processes) prompts, their groups whole (``CriticFreeTrainer``); the update
    averages the gradients and the record is averaged over the processes (``rlhf_core.distributed``)."""
    iteration = state.iteration + 1
    started = time.perf_counter()

    # 1. rollout: k samples of each prompt, on consecutive rows
    batch = rollout(
        models.policy,
        models.tokenizer,
        repeat_prompts(prompts, config.group_size),
        config,
        state.sampling_generator,
        state.precision,
    )
    response_mask = batch.response_mask.float()  # (B, T), B = P * k
    generated = time.perf_counter()

    # 2. score (no values: there is no critic)
    scores = score(models, batch, config, iteration, state.precision)
    # 3. sequence rewards
    kl = ppo.kl_estimate(scores.logprobs, scores.ref_logprobs, "k1") * response_mask  # (B, T)
    rewards = sequence_rewards(scores.penalised_scores, kl, config.kl_coef, config.kl_in)  # (B,)
    # 4. group advantages, one per response, on every one of its tokens
    advantages = group_advantages(rewards, config.group_size, config.method)  # (B,)
    token_advantages = advantages[:, None] * response_mask  # (B, T)
    data = GroupRollout(**vars(scores), batch=batch, kl=kl, rewards=rewards, advantages=token_advantages)
    scored = time.perf_counter()

    # 5. update epochs
    update = update_epochs(
        models.policy, state.optimizer, data, config, state.shuffle_generator, iteration, state.precision, state.scaler
    )
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
    record = distributed.mean_record(record)  # several processes: the same averages on each (alone: as is)
    check_finite(record["kl"], "KL to the reference", iteration, "iteration")
    state.iteration = iteration
    return record, data
