"""``PPOTrainer``: the four models of ``rlhf_core.rlhf``, their optimiser and the loop's state,
with checkpoints.

The algorithm is ``rlhf.ppo_iteration``; ``iteration_loop.IterationLoop`` draws each iteration's prompts,
keeps the history and samples, and saves and resumes through ``rlhf_core.training.save_checkpoint`` (the
same atomic checkpoints as every other trainer), so an interrupted run resumes to the same result. This
module adds the four models, their optimiser, and the value model's and KL controller's state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import distributed
from .errors import CourseError
from .iteration_loop import IterationLoop
from .models import disable_dropout
from .precision import grad_scaler, resolve_precision
from .rlhf import PPOConfig, PPOModels, PPOState, ValueModel, kl_controller, ppo_iteration, value_only_parameters


@dataclass
class PPOTrainer(IterationLoop):
    """The four models, their optimiser and the loop's state; ``step`` runs one ``ppo_iteration``,
    ``train`` runs them all with checkpoints (``IterationLoop``).

    Logged per iteration (``history``, one dict each):
      reward_model_score  mean reward-model score of the rollout (normalised: the SFT policy scores
                          0 +- 1); the same quantity ``evaluation.measure_policy`` reports as ``reward``
      penalised_score     mean of that score minus ``missing_eos_penalty`` for each response without
                          EOS: the sequence score PPO maximises
      gold          mean gold score of the same responses (the hidden human; never used in training)
      kl            mean summed KL(pi_theta || pi_ref) per response, in nats (k1)
      kl_coef       beta used in this iteration's rewards
      entropy       mean per-token entropy of the policy at the sampling temperature
      length        mean response length in tokens (EOS included); eos_fraction: share that ended
      clipfrac      share of tokens whose ratio left [1 - eps, 1 + eps] during the update
      approx_kl     k3 estimate of KL(pi_old || pi_new): how far one update moved the policy
      value_loss, policy_loss, vf_clipfrac; explained_variance of the values before the update
      seconds_generate / seconds_score / seconds_train: where the time goes
    ``samples`` holds the first response of every ``sample_every``-th iteration with its scores.

    ``precision``: fp32, bf16 or fp16 for the forward passes (None: ``RLHF_PRECISION``, else auto:
    bf16 or fp16 on CUDA, fp32 elsewhere), resolved once for the policy's device; fp16's loss scale
    is saved with the checkpoints.
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
    precision: str | None = None  # None: RLHF_PRECISION, else auto (rlhf_core.precision)
    progress_label = "PPO"

    def __post_init__(self):
        for model in (self.policy, self.reference, self.reward_model, self.value_model):
            disable_dropout(model)
        for frozen in (self.reference, self.reward_model):
            frozen.eval().requires_grad_(False)
        value_only = value_only_parameters(self.policy, self.value_model)
        if not any(p.requires_grad for p in value_only):
            raise CourseError(
                "the value model has no trainable parameters of its own (a frozen copy?): build it "
                "with ValueModel.from_reward_model or ValueModel.on_policy_trunk"
            )
        # the policy's trainable parameters: all of them, or a LoRA policy's adapters (rlhf_core.lora)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        groups = [
            {"params": trainable, "lr": self.config.policy_learning_rate},
            {"params": value_only, "lr": self.config.value_learning_rate},
        ]
        optimizer = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)
        device = next(self.policy.parameters()).device  # token sampling draws on the policy's device
        self.precision = resolve_precision(self.precision, device)
        self.state = PPOState(
            optimizer,
            kl_controller(self.config),
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
        distributed.broadcast_parameters(self.policy, self.value_model)

    @property
    def models(self) -> PPOModels:
        return PPOModels(
            self.policy, self.reference, self.reward_model, self.value_model, self.tokenizer, self.score_fn
        )

    def _iterate(self, prompts: list[str]):
        return ppo_iteration(self.models, prompts, self.process_config, self.state)

    # ----- checkpoints: the value model and beta's controller besides IterationLoop's ------------
    def _value_state(self) -> dict[str, torch.Tensor]:
        """The value model's own trained tensors: all of a copy of the reward model, the head alone on
        the policy's trunk (the trunk is the policy's, saved with it), the adapters and the head on the
        reward model's trunk (its frozen weights are the reward model's, already on disk)."""
        policy_ids = {id(p) for p in self.policy.parameters()}
        return {
            name: p.detach()
            for name, p in self.value_model.named_parameters()
            if p.requires_grad and id(p) not in policy_ids
        }

    def _extra_state(self) -> dict:
        return {
            "value_model": self._value_state(),
            "kl_controller": json.dumps(self.state.kl_controller.state_dict()),
        }

    def _load_extra_state(self, extra: dict, folder: Path) -> None:
        _, unexpected = self.value_model.load_state_dict(extra["value_model"], strict=False)
        if unexpected or not set(self._value_state()) <= set(extra["value_model"]):
            raise CourseError(f"the checkpoint in {folder} holds another value model: resume with the same config")
        self.state.kl_controller.load_state_dict(json.loads(extra["kl_controller"]))
