"""The four-model PPO loop for language models (RLHF).

One iteration (``ppo_iteration``), as in Ziegler et al. (2019), Stiennon et al. (2020) and Ouyang
et al. (2022). Each step is a function of this module, defined in this order, above the iteration:

1. **Rollout** (``rollout``). The *policy* pi_theta (initialised from SFT, trained) samples a
   response to each prompt at temperature tau, until EOS or ``max_new_tokens``.
2. **Score** (``score``). With no gradient:
   - log pi_theta(y_t | x, y_<t) and log pi_ref(y_t | x, y_<t) of every response token, both at
     the sampling temperature (the *reference* pi_ref is the frozen SFT model);
   - the *reward model* r_phi(x, y) (frozen), read at the last real token (EOS when there is one);
     the score PPO maximises is that score minus a penalty when the response never produced EOS;
   - the *value model* V_psi (initialised from the reward model, trained): one value per token.
3. **Per-token rewards** (``per_token_rewards``). r_t = -beta * KL_t, with KL_t the estimate
   ``ppo.kl_estimate`` (k1: log pi_theta(y_t) - log pi_ref(y_t)), and the penalised score added at
   the last token. The KL term is the trust region of the whole run, anchored at the SFT model.
4. **Advantages** (``ppo.gae``). GAE (gamma = 1, lambda = 0.95) over the response tokens, whitened
   over the real tokens of the batch (the same functions the gymnasium agent of chapter 00 uses).
5. **Update epochs** (``update_epochs``). A few epochs over shuffled minibatches (rows of similar
   length together, cut to the columns they use: less padding, the same per-token results): the clipped
   policy loss, the clipped value loss, gradient clipping. Then beta is adapted (Ziegler et al.)
   or kept fixed.

``rlhf_core.rlhf_trainer.PPOTrainer`` is a thin wrapper: it holds the models, the optimiser, the KL
controller, the random generators and the history; ``step`` draws prompts and runs one
``ppo_iteration``, ``train`` runs many and checkpoints through ``rlhf_core.training``, so that an
interrupted run resumes to the same result.

Mixed precision (``rlhf_core.precision``): the state carries the resolved ``precision`` and its
``GradScaler``; the rollout, the scoring and the update's forward passes run under ``autocast``,
while log-probs, values, scores, KL, advantages and losses are float32, and every update goes
through ``training.backward_and_step``.

Every number the loop logs is explained in ``PPOTrainer``; the gold score is computed for the
learner only and never enters training. Details follow "The N Implementation Details of RLHF with
PPO" (Huang, Liu & von Werra, 2023) where they matter: dropout off, temperature-scaled log-probs,
the score at the EOS token, a penalty for missing EOS, k1 KL in the reward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from . import distributed, ppo
from .batching import (
    TokenBatch,
    last_token_index,
    minibatch_rows,
    rows_and_columns,
    used_columns,
)
from .config import LORA_LEARNING_RATE_SCALE, Profile, get_profile, lora_rank_of, with_overrides
from .errors import CourseError
from .generation import Generation, generate
from .gold import gold_scores
from .logprobs import forward_logits, token_logprobs_from_logits
from .precision import autocast, resolve_precision
from .training import backward_and_step, check_finite
from .value_model import ValueModel  # noqa: F401 (rlhf_core.rlhf's API: the chapters and trainers import it from here)

# LoRA's learning rates over full fine-tuning's in PPO: a third of SFT's and DPO's 10x
# (config.LORA_LEARNING_RATE_SCALE). PPO takes many clipped steps per rollout (ppo_epochs x minibatches):
# on the tiny profile, at 10x its updates left the trust region (approx_kl about 0.1 and clipfrac 0.15-0.2
# per iteration, against full fine-tuning's 0.02 and 0.05) and the gold ended below SFT's; at 10/3 they are
# full fine-tuning's, and the gold went from +0.22 (the LoRA SFT model) to +0.59.
LORA_PPO_SCALE = LORA_LEARNING_RATE_SCALE / 3

# The adaptive controller's default horizon, in iterations: its samples are this many iterations'
# responses, so beta moves by at most a factor 1 +- 0.2 / 10 per iteration (K_beta = 0.1 in Ziegler
# et al. 2019): up to x1.81 or x0.55 over a 30-iteration run.
KL_HORIZON_ITERATIONS = 10


@dataclass
class PPOConfig:
    iterations: int = 30  # rollout + update rounds
    prompts_per_iteration: int = 64  # responses sampled per rollout (the PPO batch)
    minibatch_size: int = 16  # responses per gradient step
    ppo_epochs: int = 4  # passes over each rollout (sample reuse, kept safe by clipping)
    policy_learning_rate: float = 3e-4  # AdamW for the policy (small models tolerate more than 1e-5)
    value_learning_rate: float = 1e-3  # AdamW for the value model
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same one
    max_new_tokens: int = 64  # responses longer than this are cut and count as "no EOS"
    kl_coef: float = 0.05  # beta: weight of the per-token KL penalty to pi_ref (the start value if adaptive)
    adaptive_kl: bool = False  # adapt beta toward ``kl_target`` (Ziegler et al. 2019)
    kl_target: float = 3.0  # target KL per response (nats) for the adaptive controller
    kl_horizon: int | None = None  # samples over which the controller closes the gap (None: 10 iterations')
    kl_estimator: str = "k1"  # per-token KL in the reward (``ppo.kl_estimate``): "k1", "k2" or "k3"
    gamma: float = 1.0  # discount: none within a response
    lam: float = 0.95  # GAE lambda: bias-variance trade-off of the advantages
    clip_range: float = 0.2  # policy ratio trust region [1 - eps, 1 + eps]
    clip_range_value: float | None = 0.2  # value clipping around the rollout's values (None: off)
    value_loss_coef: float = 0.5  # weight of the value loss in the summed loss
    max_grad_norm: float = 1.0  # gradient clipping, per model (a shared trunk counts with the policy)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ended
    whiten_advantages: bool = True  # normalise advantages over the batch's real tokens
    shared_value_trunk: bool = False  # value head on the policy's own transformer instead of a copy of the RM
    lora_rank: int = 0  # LoRA adapters of this rank on the policy, pi_ref its adapters off (0: full; rlhf_core.lora)
    length_sorted_minibatches: bool = True  # minibatches of similar response length, cut to their used columns
    sample_every: int = 5  # iterations between logged sample responses
    checkpoint_every: int = 10  # iterations between resumable checkpoints (0: only at the end)
    seed: int = 0  # prompt order, sampling and minibatch shuffles

    def __post_init__(self):
        if self.kl_estimator not in ppo.KL_ESTIMATORS:
            raise CourseError(
                f"PPOConfig kl_estimator={self.kl_estimator!r} is unknown: use one of "
                f"{', '.join(ppo.KL_ESTIMATORS)} (see rlhf_core.ppo.kl_estimate)"
            )
        if self.kl_horizon is not None and self.kl_horizon <= 0:
            raise CourseError(
                f"PPOConfig kl_horizon={self.kl_horizon} must be a positive number of samples, "
                f"or None for {KL_HORIZON_ITERATIONS} iterations' samples"
            )

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> PPOConfig:
        """The defaults above are tuned for the tiny profile (2 x 128); gpt2 (124M) needs the small
        learning rates of the literature (Ziegler et al. 2019; the TRL sentiment example)."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        defaults = {"max_new_tokens": profile.max_new_tokens}
        if not profile.offline:  # the hub GPT-2s
            defaults.update(iterations=100, policy_learning_rate=1.41e-5, value_learning_rate=3e-5, kl_coef=0.1)
        lora_rank = lora_rank_of(profile, overrides)
        if lora_rank:  # LoRA: a larger step; the value model gets adapters on the reward model's own weights
            # (lora.value_and_reward_models: no third copy of the weights, rlhf_core.memory)
            rates = {
                name: defaults.get(name, getattr(cls, name)) for name in ("policy_learning_rate", "value_learning_rate")
            }
            defaults.update(lora_rank=lora_rank, **{name: LORA_PPO_SCALE * rate for name, rate in rates.items()})
            # and shuffled minibatches: on tiny, LoRA PPO on minibatches of similar length (each step's rows
            # all short, or all long: biased steps the few adapters follow) ended at rollout gold +0.16, no
            # better than the LoRA SFT model's +0.22; shuffled, +0.50 (the mean of the last 5 iterations)
            defaults.update(length_sorted_minibatches=False)
        if profile.quick:  # a smoke test (config.quick_variant): a few small iterations
            defaults.update(
                iterations=4,
                prompts_per_iteration=16,
                minibatch_size=8,
                ppo_epochs=2,
                sample_every=2,
                checkpoint_every=2,
            )
        return with_overrides(cls(**defaults), overrides)


def kl_controller(config: PPOConfig) -> ppo.FixedKLController | ppo.AdaptiveKLController:
    """beta's controller: fixed, or Ziegler et al.'s adaptive one with the horizon counted in
    samples (by default ``KL_HORIZON_ITERATIONS`` iterations' worth, so it acts within a run)."""
    if not config.adaptive_kl:
        return ppo.FixedKLController(config.kl_coef)
    horizon = config.kl_horizon or KL_HORIZON_ITERATIONS * config.prompts_per_iteration
    return ppo.AdaptiveKLController(config.kl_coef, config.kl_target, horizon)


# ----- the models --------------------------------------------------------------------------------
@dataclass
class PPOModels:
    """The four models of RLHF, and how the reward model's score is read."""

    policy: nn.Module  # pi_theta: causal LM initialised from SFT, trained
    reference: nn.Module  # pi_ref: the frozen SFT model the KL penalty anchors to
    reward_model: nn.Module  # r_phi: frozen, read by ``score_fn``
    value_model: ValueModel  # V_psi: one value per token, trained
    tokenizer: object  # encodes the prompts, decodes the responses
    score_fn: Callable  # (reward_model, input_ids, attention_mask) -> (B,) normalised scores


def value_only_parameters(policy: nn.Module, value_model: nn.Module) -> list[nn.Parameter]:
    """The value model's parameters that are not the policy's: all of them for a copy of the
    reward model, only the head for a head on the policy's trunk. Each parameter then belongs to
    exactly one optimiser group and is clipped exactly once."""
    policy_ids = {id(p) for p in policy.parameters()}
    return [p for p in value_model.parameters() if id(p) not in policy_ids]


@dataclass
class PPOState:
    """What one iteration changes besides the weights, carried from one iteration to the next."""

    optimizer: torch.optim.Optimizer  # AdamW: the policy's parameters, then the value model's own
    kl_controller: ppo.FixedKLController | ppo.AdaptiveKLController  # beta, adapted after each iteration
    shuffle_generator: torch.Generator  # CPU: prompt draws and minibatch order
    sampling_generator: torch.Generator  # on the policy's device: token sampling
    iteration: int = 0  # iterations done
    precision: str = "fp32"  # resolved precision of the forward passes (``rlhf_core.precision``)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling (None or disabled: plain steps)


# ----- the steps of one iteration, in order --------------------------------------------------------
def rollout(
    policy,
    tokenizer,
    prompts: list[str],
    config: PPOConfig,
    generator: torch.Generator | None = None,
    precision: str | None = None,
) -> Generation:
    """Step 1: one response per prompt, sampled from the policy at the config's temperature,
    until EOS or ``max_new_tokens``."""
    policy.eval()
    return generate(policy, tokenizer, prompts, config.max_new_tokens, config.temperature, generator, precision)


def _logits_and_logprobs(model, batch: TokenBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (B, T, V) and the log-probs of the response tokens at the sampling
    temperature (B, T) in float32, 0 outside the response."""
    logits = forward_logits(model, batch.input_ids, batch.attention_mask)  # (B, T, V)
    logprobs = token_logprobs_from_logits(logits, batch.input_ids, temperature) * batch.response_mask
    return logits, logprobs


@dataclass
class Scores:
    """Step 2's readings of one sampled batch, (B, T) aligned with the tokens."""

    logprobs: torch.Tensor  # (B, T) log pi_theta_old of each response token (0 elsewhere)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref of each response token
    values: torch.Tensor  # (B, T) V_old before each response token
    reward_model_scores: torch.Tensor  # (B,) the reward model's score (normalised), what measure_policy reports
    penalised_scores: torch.Tensor  # (B,) reward_model_scores minus the missing-EOS penalty: what PPO maximises


@torch.no_grad()
def score(
    models: PPOModels, batch: Generation, config: PPOConfig, iteration: int = 0, precision: str | None = None
) -> Scores:
    """Step 2: log-probs under the policy and the reference, values, and the reward model's score
    at the last real token, penalised when the response never produced EOS. ``iteration`` names
    the iteration in the error raised for a NaN score. Forward passes under ``precision``'s
    autocast (None: ``RLHF_PRECISION``, else auto); every reading is float32."""
    response_mask = batch.response_mask.float()  # (B, T)
    device = batch.input_ids.device
    precision = resolve_precision(precision, device)
    with autocast(device, precision):
        _, logprobs = _logits_and_logprobs(models.policy, batch, config.temperature)  # (B, T)
        _, ref_logprobs = _logits_and_logprobs(models.reference, batch, config.temperature)  # (B, T)
        values = models.value_model(batch.input_ids, batch.attention_mask).float() * response_mask  # (B, T)
        reward_model_scores = models.score_fn(models.reward_model, batch.input_ids, batch.attention_mask).float()
    check_finite(reward_model_scores.sum(), "reward-model score", iteration, "iteration")
    penalised_scores = reward_model_scores - config.missing_eos_penalty * (~batch.ended).float()  # (B,)
    return Scores(logprobs, ref_logprobs, values, reward_model_scores, penalised_scores)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Step 3: r_t = -beta * KL_t on response tokens, plus the sequence score at the last real token.

    scores (B,), kl (B, T), attention_mask (B, T), response_mask (B, T) -> rewards (B, T)."""
    rewards = -kl_coef * kl * response_mask  # (B, T)
    last = last_token_index(attention_mask)  # (B,): the EOS, or the last token of a cut response
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


compute_rewards = per_token_rewards  # the name the exercises and earlier course versions use


@dataclass
class Rollout(Scores):
    """Everything one iteration's update needs: the sampled batch, its ``Scores`` (step 2), and
    steps 3-4. (B, T) aligned with the tokens."""

    batch: Generation  # ids, attention mask, response mask, prompts, decoded responses
    kl: torch.Tensor  # (B, T) per-token KL estimate used in the reward
    rewards: torch.Tensor  # (B, T) -beta * KL_t, plus the penalised score at the last token
    advantages: torch.Tensor  # (B, T) GAE advantages (whitened if configured)
    returns: torch.Tensor  # (B, T) value targets


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of the sampling distribution for each token, aligned like the log-probs. (B, T)"""
    entropy = ppo.entropy_from_logits(logits[:, :-1].float() / temperature)  # (B, T-1)
    return nn.functional.pad(entropy, (1, 0))


def clip_groups(policy: nn.Module, value_model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters whose gradient norms are clipped, each list on its own to ``max_grad_norm``:
    the policy's, and the value model's own. A trunk shared by both is clipped once, with the policy."""
    return [list(policy.parameters()), value_only_parameters(policy, value_model)]


def clip_gradients(policy: nn.Module, value_model: nn.Module, max_grad_norm: float) -> None:
    """Clip the policy's gradient norm and the value model's own parameters' gradient norm, each to
    ``max_grad_norm`` (what ``training.backward_and_step`` does with ``clip_groups``)."""
    for group in clip_groups(policy, value_model):
        torch.nn.utils.clip_grad_norm_(group, max_grad_norm)


def update_epochs(
    policy,
    value_model,
    optimizer,
    data: Rollout,
    config: PPOConfig,
    generator: torch.Generator | None,
    iteration: int,
    precision: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Step 5: ``ppo_epochs`` passes over the rollout in minibatches (``batching.minibatch_rows``: in
    random order, of rows of similar length unless ``length_sorted_minibatches`` is off), each a gradient step
    on the clipped policy loss plus the weighted clipped value loss; returns the statistics
    averaged over the steps. The forward passes run under ``precision``'s autocast (None:
    ``RLHF_PRECISION``, else auto), each step goes through ``training.backward_and_step`` (clipping
    ``clip_groups``; ``scaler``: fp16's loss scaling, None for a plain step)."""
    device = data.batch.input_ids.device
    precision = resolve_precision(precision, device)
    mask = data.batch.response_mask.float()
    sums: dict[str, float] = {}
    steps = 0
    policy.train()  # dropout is off: train() only matters to modules that check it
    for _ in range(config.ppo_epochs):
        # Rows of similar response length share a minibatch, cut to the columns they use: the same
        # per-token results (positions come from the attention mask), with far less padding to run.
        for rows in minibatch_rows(mask.sum(-1), config.minibatch_size, generator, config.length_sorted_minibatches):
            # (B, T) -> (b, t): this minibatch's rows, cut to the columns they use
            cut = partial(rows_and_columns, rows=rows, columns=used_columns(data.batch.attention_mask[rows]))

            mini = TokenBatch(cut(data.batch.input_ids), cut(data.batch.attention_mask), cut(data.batch.response_mask))
            mini_mask = cut(mask)
            with autocast(device, precision):
                logits, logprobs = _logits_and_logprobs(policy, mini, config.temperature)  # (b, t, V), (b, t)
                values = value_model(mini.input_ids, mini.attention_mask).float()  # (b, t)
            policy_loss, policy_stats = ppo.policy_loss(
                logprobs, cut(data.logprobs), cut(data.advantages), mini_mask, config.clip_range
            )
            value_loss, value_stats = ppo.value_loss(
                values, cut(data.values), cut(data.returns), mini_mask, config.clip_range_value
            )
            check_finite(policy_loss, "policy loss", iteration, "iteration")
            check_finite(value_loss, "value loss", iteration, "iteration")
            loss = policy_loss + config.value_loss_coef * value_loss
            backward_and_step(loss, optimizer, scaler, clip_groups(policy, value_model), config.max_grad_norm)
            with torch.no_grad():
                entropy = ppo.masked_mean(token_entropy(logits, config.temperature), mini_mask)
            for name, value in [
                ("policy_loss", policy_loss),
                ("value_loss", value_loss),
                ("entropy", entropy),
                ("clipfrac", policy_stats["clipfrac"]),
                ("approx_kl", policy_stats["approx_kl"]),
                ("vf_clipfrac", value_stats["vf_clipfrac"]),
            ]:
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            steps += 1
    policy.eval()
    return {name: total / steps for name, total in sums.items()}


# ----- one iteration -------------------------------------------------------------------------------
def ppo_iteration(
    models: PPOModels, prompts: list[str], config: PPOConfig, state: PPOState
) -> tuple[dict[str, float], Rollout]:
    """One PPO-RLHF iteration on a batch of prompts: the five steps of the module docstring.

    Trains the policy and the value model in place, adapts beta and advances ``state``; returns
    the iteration's record (its keys are explained in ``PPOTrainer``) and the rollout it used. Several
    processes (``rlhf_core.distributed``): each runs it on its share of the prompts, and the record is
    averaged over them before beta adapts to it: the same beta and history on every process."""
    iteration = state.iteration + 1
    kl_coef = state.kl_controller.value  # beta of this iteration's rewards
    started = time.perf_counter()

    # 1. rollout
    batch = rollout(models.policy, models.tokenizer, prompts, config, state.sampling_generator, state.precision)
    response_mask = batch.response_mask.float()  # (B, T)
    generated = time.perf_counter()

    # 2. score
    scores = score(models, batch, config, iteration, state.precision)
    # 3. per-token rewards
    kl = ppo.kl_estimate(scores.logprobs, scores.ref_logprobs, config.kl_estimator) * response_mask  # (B, T)
    rewards = per_token_rewards(scores.penalised_scores, kl, kl_coef, batch.attention_mask, response_mask)
    # 4. advantages (GAE) and returns
    advantages, returns = ppo.gae(rewards, scores.values, response_mask, config.gamma, config.lam)
    if config.whiten_advantages:  # over every process's tokens when there are several (distributed)
        advantages = distributed.masked_whiten(advantages, response_mask)
    data = Rollout(**vars(scores), batch=batch, kl=kl, rewards=rewards, advantages=advantages, returns=returns)
    scored = time.perf_counter()

    # 5. update epochs
    update = update_epochs(
        models.policy,
        models.value_model,
        state.optimizer,
        data,
        config,
        state.shuffle_generator,
        iteration,
        state.precision,
        state.scaler,
    )
    trained = time.perf_counter()

    # what the learner sees; then beta adapts to this iteration's KL
    kl_per_response = (ppo.kl_estimate(data.logprobs, data.ref_logprobs, "k1") * response_mask).sum(-1)  # (B,)
    golds = gold_scores(batch.prompts, batch.responses, batch.ended.tolist())
    record = {
        "iteration": iteration,
        "reward_model_score": float(scores.reward_model_scores.mean()),
        "penalised_score": float(scores.penalised_scores.mean()),
        "gold": float(golds.mean()),
        "kl": float(kl_per_response.mean()),
        "kl_coef": kl_coef,
        "length": float(batch.response_lengths.float().mean()),
        "eos_fraction": float(batch.ended.float().mean()),
        "explained_variance": ppo.explained_variance(data.values, data.returns, response_mask),
        **update,
        "seconds_generate": generated - started,
        "seconds_score": scored - generated,
        "seconds_train": trained - scored,
    }
    record = distributed.mean_record(record)  # several processes: the same averages on each (alone: as is)
    check_finite(record["kl"], "KL to the reference", iteration, "iteration")
    state.kl_controller.update(record["kl"], len(prompts) * distributed.num_processes())  # the global batch
    state.iteration = iteration
    return record, data
