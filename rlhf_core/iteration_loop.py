"""``IterationLoop``: what PPO's and the critic-free loop's trainers share around their algorithm.

An RL trainer repeats one iteration (draw prompts, sample, score, update) that its own module defines:
``rlhf.ppo_iteration`` for PPO (``rlhf_trainer.PPOTrainer``), ``grpo.critic_free_iteration`` for GRPO,
Dr. GRPO and RLOO (``grpo_trainer.CriticFreeTrainer``). Around it, both need the same things, written
once here:

- ``step``: draw an iteration's prompts from the shuffle generator, run the iteration, keep its record
  and, every ``sample_every`` iterations, its first response with its scores and gold;
- ``train``: iterate with a progress bar, checkpoints every ``checkpoint_every`` iterations and at the
  end, and Ctrl-C handled so that nothing finished is lost (``training.InterruptGuard``);
- ``save`` / ``load``: the policy, optimiser, random states and history through
  ``training.save_checkpoint`` (one atomic write), the rest in its ``extra``; a checkpoint written with
  another config (other than ``BOOKKEEPING_FIELDS``) is refused in one line, since resuming it would
  silently mix two runs.

A trainer using it is a dataclass with ``policy``, ``prompts``, ``config``, ``history`` and ``samples``,
and, after its ``__post_init__``, ``state`` (a ``PPOState`` or ``CriticFreeState``), ``process_config``
and ``_generators``. It supplies ``_iterate`` and may add to ``_extra_state`` / ``_load_extra_state``
and ``_sample_extras``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .errors import CourseError
from .gold import gold_scores
from .training import InterruptGuard, load_checkpoint, save_checkpoint

CHECKPOINT_MARK = "training_state.pt"  # a folder holding this file has a checkpoint to resume
# Config fields a resumed run may change: when to save and what to keep for reading, never what is computed.
BOOKKEEPING_FIELDS = ("checkpoint_every", "sample_every")
ITERATION_PHASES = ("seconds_generate", "seconds_score", "seconds_train")  # each iteration record's timings


def seconds_per_iteration(history: list[dict]) -> float | None:
    """The mean wall time of one iteration of a run (sampling, scoring, the update epochs), from its history;
    ``None`` for a run with no iterations. A cached run keeps the timings of the run that trained it."""
    if not history:
        return None
    return sum(sum(record[phase] for phase in ITERATION_PHASES) for record in history) / len(history)


class IterationLoop:
    """``step``, ``train``, ``save`` and ``load`` of an RL trainer (see the module docstring)."""

    progress_label = "RL"  # the progress bar's label

    # ----- what each trainer supplies ------------------------------------------------------------
    def _iterate(self, prompts: list[str]) -> tuple[dict, object]:
        """One iteration of the algorithm on these prompts: ``(record, data)``, where ``data`` holds the
        rollout's ``batch``, ``reward_model_scores`` and ``penalised_scores``."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        """What the trainer's own ``load`` needs besides the shared state (``save``'s ``extra``)."""
        return {}

    def _load_extra_state(self, extra: dict, folder: Path) -> None:
        """Restore ``_extra_state``'s entries."""

    def _sample_extras(self, data, row: int) -> dict:
        """More of a kept sample's numbers (the critic-free loop: its advantage)."""
        return {}

    # ----- the loop ------------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Iterations done."""
        return self.state.iteration

    def step(self) -> dict[str, float]:
        """One iteration on freshly drawn prompts; appends to ``history`` and returns the record."""
        rows = torch.randint(
            len(self.prompts), (self.process_config.prompts_per_iteration,), generator=self.state.shuffle_generator
        )
        record, data = self._iterate([self.prompts[i] for i in rows.tolist()])
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
                    **self._sample_extras(data, 0),
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
        if folder is not None and resume and (folder / CHECKPOINT_MARK).exists():
            self.load(folder)
        every = self.config.checkpoint_every
        bar = tqdm(
            total=total, initial=self.iteration, desc=self.progress_label, disable=not distributed.shows(progress)
        )
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

    # ----- checkpoints ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """The policy (a loadable ``save_pretrained`` folder), optimiser, random states and history
        through ``save_checkpoint``; the sampling generator, fp16's loss scale, the samples, the config
        and the trainer's own state (``_extra_state``) in its ``extra``: one atomic write of everything
        ``load`` needs to continue exactly."""
        extra = {
            **self._extra_state(),
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
        """Continue from ``save``'s checkpoint in ``folder``, written with this trainer's config."""
        restored = load_checkpoint(folder, self.policy, self.state.optimizer, self.state.shuffle_generator)
        extra = restored["extra"]
        saved_config = json.loads(extra["config"])
        config = json.loads(json.dumps(asdict(self.config)))  # as saved: tuples become lists
        changed = sorted(
            name for name, value in config.items() if saved_config.get(name) != value and name not in BOOKKEEPING_FIELDS
        )
        if changed:
            raise CourseError(
                f"the checkpoint in {folder} was written with another config ({', '.join(changed)} "
                "differ): resume with the same config, or pass resume=False to start over"
            )
        self._load_extra_state(extra, Path(folder))
        self.state.sampling_generator.set_state(extra["sampling_rng"])
        distributed.restore_process_rng(extra.get("process_rng"), self._generators, self.config.seed)
        if self.state.scaler.is_enabled() and extra.get("scaler"):
            self.state.scaler.load_state_dict(extra["scaler"])
        self.state.iteration = restored["step"]
        self.history = restored["history"]
        self.samples = json.loads(extra["samples"])
