"""The four-model PPO loop for language models (RLHF).

One iteration, as in Ziegler et al. (2019), Stiennon et al. (2020) and Ouyang et al. (2022):

1. **Rollout.** The *policy* pi_theta (initialised from SFT, trained) samples a response to each
   prompt at temperature tau, until EOS or ``max_new_tokens``.
2. **Score.** With no gradient:
   - log pi_theta(y_t | x, y_<t) and log pi_ref(y_t | x, y_<t) of every response token, both at
     the sampling temperature (the *reference* pi_ref is the frozen SFT model);
   - the *reward model* r_phi(x, y) (frozen), read at the last real token (EOS when there is one),
     minus a penalty when the response never produced EOS;
   - the *value model* V_psi (initialised from the reward model, trained): one value per token.
3. **Rewards.** Per token: r_t = -beta * KL_t, with KL_t = log pi_theta(y_t) - log pi_ref(y_t) (k1),
   and the reward-model score added at the last token. The KL term is the trust region of the
   whole run, anchored at the SFT model.
4. **Advantages.** GAE (gamma = 1, lambda = 0.95) over the response tokens, whitened over the real
   tokens of the batch (``rlhf_core.ppo``, the same functions the gymnasium agent uses).
5. **Update.** A few epochs over shuffled minibatches: the clipped policy loss, the clipped value
   loss, gradient clipping. Then beta is adapted (Ziegler et al.) or kept fixed.

Every number the loop logs is explained in ``PPOStats``; the gold score is computed for the
learner only and never enters training. Details follow "The N Implementation Details of RLHF with
PPO" (Huang, Liu & von Werra, 2023) where they matter: dropout off, temperature-scaled log-probs,
the score at the EOS token, a penalty for missing EOS, k1 KL in the reward.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import ppo
from .batching import TokenBatch, last_token_index, position_ids_from_mask
from .generation import Generation, generate
from .gold import gold_scores
from .logprobs import token_logprobs_from_logits
from .models import disable_dropout
from .training import check_finite, restore_rng_states, rng_states


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
    kl_coef: float = 0.05  # beta: weight of the per-token KL penalty to pi_ref
    adaptive_kl: bool = False  # adapt beta toward ``kl_target`` (Ziegler et al. 2019)
    kl_target: float = 3.0  # target KL per response (nats) for the adaptive controller
    kl_horizon: int = 10_000  # samples over which the adaptive controller closes the gap
    kl_estimator: str = "k1"  # per-token KL in the reward: "k1" (log ratio) or "k3" (always >= 0)
    gamma: float = 1.0  # discount: none within a response
    lam: float = 0.95  # GAE lambda: bias-variance trade-off of the advantages
    clip_range: float = 0.2  # policy ratio trust region [1 - eps, 1 + eps]
    clip_range_value: float | None = 0.2  # value clipping around the rollout's values (None: off)
    value_loss_coef: float = 0.5  # weight of the value loss in the summed loss
    max_grad_norm: float = 1.0  # gradient clipping, per model
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ended
    whiten_advantages: bool = True  # normalise advantages over the batch's real tokens
    shared_value_trunk: bool = False  # value head on the policy's own transformer instead of a copy of the RM
    sample_every: int = 5  # iterations between logged sample responses
    checkpoint_every: int = 10  # iterations between resumable checkpoints (0: never)
    seed: int = 0  # prompt order, sampling and minibatch shuffles

    @classmethod
    def for_profile(cls, profile, **overrides) -> "PPOConfig":
        """The defaults above are tuned for the tiny profile (2 x 128); gpt2 (124M) needs the small
        learning rates of the literature (Ziegler et al. 2019; the TRL sentiment example)."""
        config = cls(max_new_tokens=profile.max_new_tokens)
        if profile.name == "gpt2":
            config.iterations = 100
            config.policy_learning_rate = 1.41e-5
            config.value_learning_rate = 3e-5
            config.kl_coef = 0.1
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise TypeError(f"PPOConfig has no field {name!r}")
            setattr(config, name, value)
        return config


class ValueModel(nn.Module):
    """A transformer trunk and a scalar head giving one value per token.

    ``values[:, t]`` estimates the return when the model is about to write token t: it is read
    from the hidden state at t - 1, the same state the policy's logits for token t come from.
    """

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk = trunk  # GPT2Model: (B, T) ids -> (B, T, d) hidden states
        self.head = head  # Linear(d, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask)).last_hidden_state  # (B, T, d)
        values = self.head(hidden).squeeze(-1)  # (B, T): value after reading token t
        return nn.functional.pad(values[:, :-1], (1, 0))  # (B, T): value before writing token t

    @classmethod
    def from_reward_model(cls, reward_model) -> "ValueModel":
        """InstructGPT's choice: start from the reward model, which already reads responses.

        The reward model's normalisation (gain, bias: SFT samples score 0 +- 1) is folded into the
        new head, so the first values are on the scale of the rewards they must predict."""
        from .reward_model import normalization

        copied = copy.deepcopy(reward_model)
        gain, bias = normalization(reward_model)
        head = nn.Linear(copied.score.in_features, 1)
        with torch.no_grad():
            head.weight.copy_(gain * copied.score.weight)
            head.bias.fill_(bias)
            if copied.score.bias is not None:
                head.bias.add_(gain * copied.score.bias)
        head.to(copied.score.weight.device)
        return cls(copied.transformer, head)

    @classmethod
    def on_policy_trunk(cls, policy) -> "ValueModel":
        """The cheaper option: a new head on the policy's own transformer (shared parameters)."""
        head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(policy.transformer, head)


@dataclass
class Rollout:
    """Everything one iteration's update needs, (B, T) aligned with the tokens."""

    batch: Generation  # ids, attention mask, response mask, prompts, decoded responses
    logprobs: torch.Tensor  # (B, T) log pi_theta_old of each response token (0 elsewhere)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref of each response token
    values: torch.Tensor  # (B, T) V_old before each response token
    scores: torch.Tensor  # (B,) reward-model score (normalised) minus the missing-EOS penalty
    kl: torch.Tensor  # (B, T) per-token KL estimate used in the reward
    rewards: torch.Tensor  # (B, T) -beta * KL_t, plus the score at the last token
    advantages: torch.Tensor  # (B, T) GAE advantages (whitened if configured)
    returns: torch.Tensor  # (B, T) value targets


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Estimate of KL(pi_theta || pi_ref) at each sampled token (samples come from pi_theta).

    k1 = log pi_theta - log pi_ref (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = pi_ref / pi_theta (unbiased, never negative; Schulman 2020).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """r_t = -beta * KL_t on response tokens, plus the sequence score at the last real token."""
    rewards = -kl_coef * kl * response_mask  # (B, T)
    last = last_token_index(attention_mask)  # (B,): the EOS, or the last token of a cut response
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def _logits_and_logprobs(policy, batch: TokenBatch, temperature: float):
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=position_ids_from_mask(batch.attention_mask)).logits  # (B, T, V)
    logprobs = token_logprobs_from_logits(logits, batch.input_ids, temperature) * batch.response_mask
    return logits, logprobs


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of the sampling distribution for each token, aligned like the log-probs. (B, T)"""
    entropy = ppo.entropy_from_logits(logits[:, :-1].float() / temperature)  # (B, T-1)
    return nn.functional.pad(entropy, (1, 0))


def ppo_update(policy, value_model, optimizer, data: Rollout, config: PPOConfig,
               generator: torch.Generator | None, iteration: int) -> dict[str, float]:
    """Step 5: epochs of minibatch updates on one rollout; returns the averaged statistics."""
    size = len(data.batch)
    mask = data.batch.response_mask.float()
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, config.minibatch_size):
            rows = order[start:start + config.minibatch_size]
            mini = TokenBatch(data.batch.input_ids[rows], data.batch.attention_mask[rows], data.batch.response_mask[rows])
            mini_mask = mask[rows]
            logits, logprobs = _logits_and_logprobs(policy, mini, config.temperature)
            policy_loss, policy_stats = ppo.policy_loss(logprobs, data.logprobs[rows], data.advantages[rows],
                                                        mini_mask, config.clip_range)
            values = value_model(mini.input_ids, mini.attention_mask)
            value_loss, value_stats = ppo.value_loss(values, data.values[rows], data.returns[rows], mini_mask,
                                                     config.clip_range_value)
            check_finite(policy_loss, "policy loss", iteration, "iteration")
            check_finite(value_loss, "value loss", iteration, "iteration")
            loss = policy_loss + config.value_loss_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(value_model.parameters(), config.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                entropy = ppo.masked_mean(token_entropy(logits, config.temperature), mini_mask)
            for name, value in [("policy_loss", policy_loss), ("value_loss", value_loss), ("entropy", entropy),
                                ("clipfrac", policy_stats["clipfrac"]), ("approx_kl", policy_stats["approx_kl"]),
                                ("vf_clipfrac", value_stats["vf_clipfrac"])]:
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            steps += 1
    return {name: total / steps for name, total in sums.items()}


@dataclass
class PPOTrainer:
    """The four models, their optimiser and the loop's state; ``train`` runs the iterations.

    Logged per iteration (``history``, one dict each):
      reward        mean reward-model score of the rollout (normalised: the SFT policy scores 0 +- 1)
      gold          mean gold score of the same responses (the hidden human; never used in training)
      kl            mean summed KL(pi_theta || pi_ref) per response, in nats (k1)
      kl_coef       beta used in this iteration's rewards
      entropy       mean per-token entropy of the policy at the sampling temperature
      length        mean response length in tokens (EOS included); eos_fraction: share that ended
      clipfrac      share of tokens whose ratio left [1 - eps, 1 + eps] during the update
      approx_kl     k3 estimate of KL(pi_old || pi_new): how far one update moved the policy
      value_loss, policy_loss; explained_variance of the values before the update
      seconds_generate / seconds_score / seconds_train: where the time goes
    """

    policy: nn.Module
    reference: nn.Module
    reward_model: nn.Module
    value_model: ValueModel
    tokenizer: object
    prompts: list[str]
    config: PPOConfig
    score_fn: Callable  # (reward_model, input_ids, attention_mask) -> (B,) normalised scores
    history: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    iteration: int = 0

    def __post_init__(self):
        for model in (self.policy, self.reference, self.reward_model, self.value_model):
            disable_dropout(model)
        for frozen in (self.reference, self.reward_model):
            frozen.eval().requires_grad_(False)
        parameters = [{"params": list(self.policy.parameters()), "lr": self.config.policy_learning_rate}]
        policy_ids = {id(p) for p in self.policy.parameters()}
        value_only = [p for p in self.value_model.parameters() if id(p) not in policy_ids]
        parameters.append({"params": value_only, "lr": self.config.value_learning_rate})
        self.optimizer = torch.optim.AdamW(parameters, eps=1e-5, weight_decay=0.0)
        self.kl_controller = (ppo.AdaptiveKLController(self.config.kl_coef, self.config.kl_target, self.config.kl_horizon)
                              if self.config.adaptive_kl else ppo.FixedKLController(self.config.kl_coef))
        self.generator = torch.Generator().manual_seed(self.config.seed)  # prompt order, minibatch shuffles (CPU)
        device = next(self.policy.parameters()).device  # token sampling draws on the policy's device
        self.sampling_generator = torch.Generator(device=device).manual_seed(self.config.seed + 1)

    def _prompt_batch(self) -> list[str]:
        rows = torch.randint(len(self.prompts), (self.config.prompts_per_iteration,), generator=self.generator)
        return [self.prompts[i] for i in rows.tolist()]

    def step(self) -> dict[str, float]:
        """One iteration: rollout, score, update; appends to ``history`` and returns the record."""
        config = self.config
        self.policy.eval()
        started = time.perf_counter()
        prompts = self._prompt_batch()
        batch = generate(self.policy, self.tokenizer, prompts, config.max_new_tokens, config.temperature,
                         self.sampling_generator)
        generated = time.perf_counter()
        data = score_rollout(batch, self.policy, self.reference, self.reward_model, self.value_model,
                             self.score_fn, config, self.kl_controller.value, self.iteration + 1)
        scored = time.perf_counter()
        mask = batch.response_mask.float()
        explained = ppo.explained_variance(data.values, data.returns, mask)
        self.policy.train()  # dropout is off: train() only matters to modules that check it
        update = ppo_update(self.policy, self.value_model, self.optimizer, data, config, self.generator,
                            self.iteration + 1)
        self.policy.eval()
        trained = time.perf_counter()
        kl_per_response = (per_token_kl(data.logprobs, data.ref_logprobs, "k1") * mask).sum(-1)  # (B,)
        golds = gold_scores(batch.prompts, batch.responses, batch.ended.tolist())
        record = {
            "iteration": self.iteration + 1,
            "reward": float(data.scores.mean()),
            "gold": float(golds.mean()),
            "kl": float(kl_per_response.mean()),
            "kl_coef": self.kl_controller.value,
            "length": float(batch.response_lengths.float().mean()),
            "eos_fraction": float(batch.ended.float().mean()),
            "explained_variance": explained,
            **update,
            "seconds_generate": generated - started,
            "seconds_score": scored - generated,
            "seconds_train": trained - scored,
        }
        check_finite(record["kl"], "KL to the reference", self.iteration + 1, "iteration")
        self.kl_controller.update(record["kl"], config.prompts_per_iteration)
        self.history.append(record)
        if config.sample_every and self.iteration % config.sample_every == 0:
            self.samples.append({"iteration": self.iteration + 1, "prompt": batch.prompts[0],
                                 "response": batch.responses[0], "reward": float(data.scores[0]),
                                 "gold": float(golds[0])})
        self.iteration += 1
        return record

    def train(self, iterations: int | None = None, checkpoint_dir: str | Path | None = None,
              callback: Callable[[dict], None] | None = None, progress: bool = True,
              stop_after_iterations: int | None = None) -> list[dict]:
        """Run until ``iterations`` (default: the config's) are done, checkpointing as configured.

        With a ``checkpoint_dir`` that holds a checkpoint, training resumes from it. ``callback``
        gets each iteration's record (live plots). ``stop_after_iterations`` ends this call early
        after saving a checkpoint (a simulated disconnect)."""
        from tqdm.auto import tqdm

        total = iterations or self.config.iterations
        if checkpoint_dir is not None and (Path(checkpoint_dir) / "training_state.pt").exists():
            self.load(checkpoint_dir)
        done_this_call = 0
        bar = tqdm(total=total, initial=self.iteration, desc="PPO", disable=not progress)
        while self.iteration < total:
            if stop_after_iterations is not None and done_this_call >= stop_after_iterations:
                break
            record = self.step()
            done_this_call += 1
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:+.2f}", gold=f"{record['gold']:+.2f}", kl=f"{record['kl']:.2f}")
            if callback is not None:
                callback(record)
            every = self.config.checkpoint_every
            if checkpoint_dir is not None and every and self.iteration % every == 0:
                self.save(checkpoint_dir)
        bar.close()
        if checkpoint_dir is not None:
            self.save(checkpoint_dir)
        return self.history

    # ----- checkpoints -------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Policy (a loadable ``save_pretrained`` folder), value model, optimiser, KL controller,
        random states, history: everything ``load`` needs to continue exactly."""
        from safetensors.torch import save_model

        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(partial / "policy", safe_serialization=True)
        save_model(self.value_model, str(partial / "value_model.safetensors"))
        torch.save({"iteration": self.iteration, "optimizer": self.optimizer.state_dict(),
                    "kl_controller": json.dumps(self.kl_controller.state_dict()),
                    "rng": rng_states(self.generator), "sampling_rng": self.sampling_generator.get_state(),
                    "history": json.dumps(self.history),
                    "samples": json.dumps(self.samples), "config": json.dumps(asdict(self.config))},
                   partial / "training_state.pt")
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        return folder

    def load(self, folder: str | Path) -> None:
        from safetensors.torch import load_model

        folder = Path(folder)
        load_model(self.policy, str(folder / "policy" / "model.safetensors"), strict=False)
        load_model(self.value_model, str(folder / "value_model.safetensors"))
        state = torch.load(folder / "training_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_controller.load_state_dict(json.loads(state["kl_controller"]))
        restore_rng_states(state["rng"], self.generator)
        if "sampling_rng" in state:  # checkpoints of older course versions sampled from ``generator``
            self.sampling_generator.set_state(state["sampling_rng"])
        self.iteration = state["iteration"]
        self.history = json.loads(state["history"])
        self.samples = json.loads(state["samples"])


@torch.no_grad()
def score_rollout(batch: Generation, policy, reference, reward_model, value_model, score_fn: Callable,
                  config: PPOConfig, kl_coef: float, iteration: int = 0) -> Rollout:
    """Steps 2-4 of the module docstring for a generated batch: log-probs, reference log-probs,
    values, scores, per-token rewards, advantages and returns."""
    response_mask = batch.response_mask.float()  # (B, T)
    _, logprobs = _logits_and_logprobs(policy, batch, config.temperature)  # (B, T)
    _, ref_logprobs = _logits_and_logprobs(reference, batch, config.temperature)  # (B, T)
    values = value_model(batch.input_ids, batch.attention_mask) * response_mask  # (B, T)
    scores = score_fn(reward_model, batch.input_ids, batch.attention_mask).float()  # (B,)
    check_finite(scores.sum(), "reward-model score", iteration, "iteration")
    scores = scores - config.missing_eos_penalty * (~batch.ended).float()
    kl = per_token_kl(logprobs, ref_logprobs, config.kl_estimator) * response_mask  # (B, T)
    rewards = compute_rewards(scores, kl, kl_coef, batch.attention_mask, response_mask)  # (B, T)
    advantages, returns = ppo.gae(rewards, values, response_mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, response_mask)
    return Rollout(batch, logprobs, ref_logprobs, values, scores, kl, rewards, advantages, returns)


def save_history(history: list[dict], folder: str | Path) -> tuple[Path, Path]:
    """Write the per-iteration records as ``history.csv`` (spreadsheets, pandas) and
    ``history.json`` (exact floats); returns both paths."""
    import csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(key for record in history for key in record))
    with open(folder / "history.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
    (folder / "history.json").write_text(json.dumps(history, indent=1))
    return folder / "history.csv", folder / "history.json"


# ----- the stage: four models built from the earlier chapters' caches ---------------------------
def build_ppo_trainer(profile=None, config: PPOConfig | None = None, device=None,
                      progress: bool = True) -> PPOTrainer:
    """The four models of the profile: policy and reference from SFT (``rlhf_core.sft``), the
    reward model (``rlhf_core.reward_model``) and a value model initialised from it; each is
    built and cached by its own stage when missing. Prompts: the profile's training prompts."""
    from .config import get_profile, select_device
    from .prompts import load_prompts
    from .reward_model import load_or_train_reward_model, score_batch
    from .sft import load_or_train_sft

    profile = profile or get_profile()
    config = config or PPOConfig.for_profile(profile)
    device = device or select_device()
    policy, reference, tokenizer = load_or_train_sft(profile, device=device, progress=progress)
    reward_model, _, _ = load_or_train_reward_model(profile, device=device, progress=progress)
    value_model = (ValueModel.on_policy_trunk(policy) if config.shared_value_trunk
                   else ValueModel.from_reward_model(reward_model)).to(device)
    torch.manual_seed(config.seed)
    return PPOTrainer(policy, reference, reward_model, value_model, tokenizer, load_prompts(profile, "train"),
                      config, score_batch)


def ppo_dir(profile, config: PPOConfig) -> Path:
    """``cache_dir()/<profile>/ppo-beta<kl_coef>[-adaptive]-<hash of the whole config>``."""
    import hashlib

    from .config import cache_dir

    digest = hashlib.sha1(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:8]
    name = f"ppo-beta{config.kl_coef:g}{'-adaptive' if config.adaptive_kl else ''}-{digest}"
    return cache_dir() / profile.name / name


def load_or_train_ppo(profile=None, config: PPOConfig | None = None, device=None, progress: bool = True,
                      callback: Callable[[dict], None] | None = None):
    """``(policy, history, samples)`` of a finished PPO run with this config, from the cache or
    trained now. Training checkpoints every ``config.checkpoint_every`` iterations into the run's
    folder and resumes from there after an interruption; the final policy is saved with
    ``save_pretrained`` next to ``ppo_summary.json`` (config, history, samples)."""
    from .config import get_profile, select_device
    from .models import load_causal_lm

    profile = profile or get_profile()
    config = config or PPOConfig.for_profile(profile)
    device = device or select_device()
    folder = ppo_dir(profile, config)
    summary_path = folder / "ppo_summary.json"
    if summary_path.exists() and (folder / "policy" / "model.safetensors").exists():
        summary = json.loads(summary_path.read_text())
        if summary["config"] == asdict(config):
            return load_causal_lm(folder / "policy", device=device), summary["history"], summary["samples"]
    trainer = build_ppo_trainer(profile, config, device, progress)
    started = time.perf_counter()
    trainer.train(checkpoint_dir=folder / "checkpoint", callback=callback, progress=progress)
    trainer.policy.save_pretrained(folder / "policy", safe_serialization=True)
    summary = {"config": asdict(config), "seconds_this_run": round(time.perf_counter() - started, 1),
               "history": trainer.history, "samples": trainer.samples}
    summary_path.write_text(json.dumps(summary, indent=1))
    save_history(trainer.history, folder)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # finished: the final policy replaces it
    return trainer.policy.eval(), trainer.history, trainer.samples
