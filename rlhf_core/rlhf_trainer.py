"""``PPOTrainer``: the four models of ``rlhf_core.rlhf``, their optimiser and the loop's state,
with checkpoints.

The algorithm is ``rlhf.ppo_iteration``; this wrapper only draws each iteration's prompts, keeps the
history and samples, and saves and resumes through ``rlhf_core.training.save_checkpoint`` (the
same atomic checkpoints as every other trainer), so an interrupted run resumes to the same result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .errors import CourseError
from .gold import gold_scores
from .models import disable_dropout
from .precision import grad_scaler, resolve_precision
from .rlhf import PPOConfig, PPOModels, PPOState, ValueModel, kl_controller, ppo_iteration, value_only_parameters
from .training import InterruptGuard, load_checkpoint, save_checkpoint


@dataclass
class PPOTrainer:
    """The four models, their optimiser and the loop's state; ``step`` runs one ``ppo_iteration``,
    ``train`` runs them all with checkpoints.

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

    @property
    def iteration(self) -> int:
        """Iterations done."""
        return self.state.iteration

    def step(self) -> dict[str, float]:
        """One iteration on freshly drawn prompts; appends to ``history`` and returns the record."""
        rows = torch.randint(
            len(self.prompts), (self.process_config.prompts_per_iteration,), generator=self.state.shuffle_generator
        )
        record, data = ppo_iteration(
            self.models, [self.prompts[i] for i in rows.tolist()], self.process_config, self.state
        )
        self.history.append(record)
        every = self.config.sample_every
        if every and (record["iteration"] - 1) % every == 0:
            batch = data.batch
            gold = gold_scores(batch.prompts[:1], batch.responses[:1], batch.ended[:1].tolist())
            self.samples.append(
                {
                    "iteration": record["iteration"],
                    "prompt": batch.prompts[0],
                    "response": batch.responses[0],
                    "reward_model_score": float(data.reward_model_scores[0]),
                    "penalised_score": float(data.penalised_scores[0]),
                    "gold": float(gold[0]),
                }
            )
        return record

    def train(
        self,
        iterations: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = True,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        stop_after_iterations: int | None = None,
    ) -> list[dict]:
        """Run until ``iterations`` (default: the config's) are done; returns the history.

        With a ``checkpoint_dir``, a checkpoint is saved every ``checkpoint_every`` iterations and
        at the end, and (``resume=True``) a checkpoint found there is continued, to the same result
        as a run never stopped. Ctrl-C finishes the current iteration, saves, says where the next
        run resumes and re-raises KeyboardInterrupt (a second Ctrl-C stops at once, unsaved).
        ``callback`` gets each iteration's record (live plots). ``stop_after_iterations`` ends this
        call early after saving a checkpoint (a simulated disconnect)."""
        total = iterations or self.config.iterations
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if folder is not None and resume and (folder / "training_state.pt").exists():
            self.load(folder)
        every = self.config.checkpoint_every
        bar = tqdm(total=total, initial=self.iteration, desc="PPO", disable=not distributed.shows(progress))
        done_this_call = 0
        with InterruptGuard() as interrupt:
            try:
                while self.iteration < total:
                    if stop_after_iterations is not None and done_this_call >= stop_after_iterations:
                        break
                    interrupt.busy = True
                    record = self.step()
                    if folder is not None and every and self.iteration % every == 0:
                        self.save(folder)
                    interrupt.busy = False
                    done_this_call += 1
                    bar.update(1)
                    bar.set_postfix(
                        score=f"{record['reward_model_score']:+.2f}",
                        gold=f"{record['gold']:+.2f}",
                        kl=f"{record['kl']:.2f}",
                    )
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
        if inside_iteration or distributed.is_distributed():  # half an update, or processes at other points
            where = f"the last checkpoint in {folder}" if folder is not None else "scratch (no checkpoint_dir)"
            return (
                f"interrupted inside iteration {self.iteration + 1}, nothing saved: the next run resumes from {where}"
            )
        if folder is None:
            return f"interrupted at iteration {self.iteration}, nothing saved (no checkpoint_dir)"
        self.save(folder)
        return f"interrupted at iteration {self.iteration}, the next run resumes from {folder}"

    # ----- checkpoints -------------------------------------------------------------------
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

    def save(self, folder: str | Path) -> Path:
        """The policy (a loadable ``save_pretrained`` folder), optimiser, random states and history
        through ``save_checkpoint``; the value model, KL controller, sampling generator and samples
        in its ``extra``: one atomic write of everything ``load`` needs to continue exactly."""
        extra = {
            "value_model": self._value_state(),
            "kl_controller": json.dumps(self.state.kl_controller.state_dict()),
            "sampling_rng": self.state.sampling_generator.get_state(),
            "process_rng": distributed.process_rng_states(self._generators),  # several processes: each one's
            "samples": json.dumps(self.samples),
            "config": json.dumps(asdict(self.config)),
            "scaler": self.state.scaler.state_dict(),
        }
        return save_checkpoint(
            folder, self.policy, self.state.optimizer, self.iteration, self.history, self.state.shuffle_generator, extra
        )

    def load(self, folder: str | Path) -> None:
        restored = load_checkpoint(folder, self.policy, self.state.optimizer, self.state.shuffle_generator)
        extra = restored["extra"]
        _, unexpected = self.value_model.load_state_dict(extra["value_model"], strict=False)
        if unexpected or not set(self._value_state()) <= set(extra["value_model"]):
            raise CourseError(f"the checkpoint in {folder} holds another value model: resume with the same config")
        self.state.kl_controller.load_state_dict(json.loads(extra["kl_controller"]))
        self.state.sampling_generator.set_state(extra["sampling_rng"])
        distributed.restore_process_rng(extra.get("process_rng"), self._generators, self.config.seed)
        if self.state.scaler.is_enabled() and extra.get("scaler"):
            self.state.scaler.load_state_dict(extra["scaler"])
        self.state.iteration = restored["step"]
        self.history = restored["history"]
        self.samples = json.loads(extra["samples"])
