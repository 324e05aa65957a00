"""``CriticFreeTrainer``: the three models of ``rlhf_core.grpo`` (policy, reference, reward model; no value
model), the policy's optimiser and the loop's state, with checkpoints.

The algorithm is ``grpo.critic_free_iteration``; ``iteration_loop.IterationLoop`` draws each iteration's
prompts, keeps the history and samples, and saves and resumes, as for ``rlhf_trainer.PPOTrainer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import distributed
from .grpo import CriticFreeConfig, CriticFreeModels, CriticFreeState, critic_free_iteration
from .iteration_loop import IterationLoop
from .models import disable_dropout
from .precision import grad_scaler, resolve_precision


@dataclass
class CriticFreeTrainer(IterationLoop):
    """The three models, the policy's optimiser and the loop's state; ``step`` runs one
    ``critic_free_iteration``, ``train`` runs them all with checkpoints (``IterationLoop``).

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
    precision: str | None = None  # None: RLHF_PRECISION, else auto (rlhf_core.precision)

    def __post_init__(self):
        for model in (self.policy, self.reference, self.reward_model):
            disable_dropout(model)
        for frozen in (self.reference, self.reward_model):
            frozen.eval().requires_grad_(False)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]  # a LoRA policy: its adapters
        optimizer = torch.optim.AdamW(trainable, lr=self.config.learning_rate, eps=1e-5, weight_decay=0.0)
        device = next(self.policy.parameters()).device  # token sampling draws on the policy's device
        self.precision = resolve_precision(self.precision, device)
        self.state = CriticFreeState(
            optimizer,
            # several processes (rlhf_core.distributed): each its own prompts and samples; process 0 the usual ones
            shuffle_generator=torch.Generator().manual_seed(distributed.process_seed(self.config.seed)),
            sampling_generator=torch.Generator(device=device).manual_seed(
                distributed.process_seed(self.config.seed + 1)
            ),
            precision=self.precision,
            scaler=grad_scaler(device, self.precision),
        )
        # Several processes: the prompts of an iteration and a minibatch's responses are split between them
        # (rlhf_core.distributed), all starting from the main process's weights. Alone: the config itself.
        self.process_config = distributed.split_config(self.config, ("prompts_per_iteration", "minibatch_size"))
        self._generators = (self.state.shuffle_generator, self.state.sampling_generator)
        distributed.broadcast_parameters(self.policy)

    @property
    def models(self) -> CriticFreeModels:
        return CriticFreeModels(self.policy, self.reference, self.reward_model, self.tokenizer, self.score_fn)

    @property
    def progress_label(self) -> str:
        return self.config.method  # "grpo", "dr_grpo" or "rloo"

    def _iterate(self, prompts: list[str]):
        return critic_free_iteration(self.models, prompts, self.process_config, self.state)

    def _sample_extras(self, data, row: int) -> dict:
        return {"advantage": float(data.advantages[row].sum() / data.batch.response_mask[row].sum())}
