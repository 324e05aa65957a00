"""Pretraining the offline world's base model: a small GPT-2 that has read many reviews.

RLHF starts from a model that already writes fluent text. The gpt2 profile takes it from the hub;
the offline profiles make their own: a byte-level BPE tokenizer and a small ``GPT2LMHeadModel``
trained with the plain next-token loss (Radford et al., 2019) on whole reviews from
``rlhf_core.world``, of every mood, each ending in EOS. The result reads like the world's reviews,
positive and negative alike, and knows when to stop; it has no preference of its own. That is
what SFT, the reward model and PPO will change.

    python -m rlhf_core pretrain --profile tiny     # rewrites data/tokenizer and data/base-tiny
    python -m rlhf_core pretrain --profile small    # writes cache/base-small (tokenizer from data/)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .batching import TokenBatch, pack, per_row_in_buckets, position_ids_from_mask
from .config import Profile, data_dir, get_profile, seed_everything, with_overrides
from .errors import CourseError
from .loop import batch_rows, save_final, steps_done, train_loop
from .models import count_parameters, new_model
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from .training import adamw


@dataclass
class PretrainConfig:
    steps: int = 1500  # optimiser steps
    batch_size: int = 64  # reviews per step
    learning_rate: float = 3e-3  # peak AdamW learning rate (small models like it high)
    warmup_steps: int = 100  # linear warmup before the cosine decay
    weight_decay: float = 0.01  # AdamW decoupled weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm)
    n_train_reviews: int = 60_000  # reviews drawn once from the world for training
    n_validation_reviews: int = 1_000  # held-out reviews (another seed) for the validation loss
    eval_every: int = 250  # steps between validation-loss measurements (0: only at the end)
    plateau_evaluations: int = 0  # stop early once this many validation losses in a row have not improved on
    # the best before them by plateau_min_improvement (0: always run all ``steps``)
    plateau_min_improvement: float = 0.01  # relative drop of the validation loss that counts as progress
    plateau_cooldown: float = 0.25  # after the plateau, this fraction of the steps so far again, the learning
    # rate's cosine re-planned to end there (a model stopped at a high learning rate is worse than one annealed)
    checkpoint_every: int = 500  # steps between resumable checkpoints (0: never)
    seed: int = 0  # model initialisation and batch order

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> PretrainConfig:
        """The profile's pretraining run (steps, batch size and learning rate come from the profile)."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        config = cls(
            steps=profile.pretrain_steps, batch_size=profile.pretrain_batch_size, learning_rate=profile.pretrain_lr
        )
        if profile.name == "small":
            # 3,000 steps took 39 minutes of 2 cores, and the loss stopped improving long before (1.30 at step
            # 850, 1.32 at 1,165): stop when 3 validation losses, 300 steps, gain less than 1% on the best.
            config = replace(config, eval_every=100, plateau_evaluations=3)
        return with_overrides(config, overrides)


def at_plateau(history: list[dict], config: PretrainConfig) -> bool:
    """Whether the last ``config.plateau_evaluations`` validation losses all failed to improve on the
    best one before them by ``config.plateau_min_improvement`` (relative); never when that is 0."""
    losses = [record["validation_loss"] for record in history if "validation_loss" in record]
    patience = config.plateau_evaluations
    if not patience or len(losses) <= patience:
        return False
    return min(losses[-patience:]) > min(losses[:-patience]) * (1 - config.plateau_min_improvement)


def plateau_step(history: list[dict], config: PretrainConfig) -> int | None:
    """The step whose validation loss first showed the plateau (``at_plateau``), or None."""
    for index, record in enumerate(history):
        if "validation_loss" in record and at_plateau(history[: index + 1], config):
            return record["step"]
    return None


def planned_steps(history: list[dict], config: PretrainConfig) -> int:
    """The run's length: ``config.steps``, or once the plateau is found the plateau's step and a
    cooldown of ``plateau_cooldown`` times as many steps (never more than ``config.steps``)."""
    plateau = plateau_step(history, config)
    if plateau is None:
        return config.steps
    return min(config.steps, plateau + round(config.plateau_cooldown * plateau))


def tokenize_reviews(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each review's ids with EOS appended: the model learns where a review ends."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def row_token_losses(model, batch: TokenBatch) -> torch.Tensor:
    """Each row's summed next-token cross-entropy over its real tokens (all but the first, which
    nothing predicts). (B,)"""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
    ).logits  # (B, T, V)
    targets = batch.input_ids[:, 1:]  # (B, T-1)
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return (token_loss * batch.attention_mask[:, 1:].float()).sum(-1)


def bucketed_language_model_loss(model, batch: TokenBatch) -> torch.Tensor:
    """``language_model_loss`` of a batch of whole texts, its rows run in buckets of similar length
    (``batching.per_row_in_buckets``): the same mean up to float rounding, without the padding's
    compute (a batch of 64 world reviews padded to its longest is about half padding)."""
    row_sums = per_row_in_buckets(batch, lambda rows: row_token_losses(model, rows))  # (B,)
    return row_sums.sum() / batch.attention_mask[:, 1:].sum().clamp(min=1)


def language_model_loss(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens where ``loss_mask`` (default: the attention
    mask) is 1. A token is predicted from the position before it, so its mask entry counts there."""
    loss_mask = attention_mask if loss_mask is None else loss_mask
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).logits  # (B, T, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    weights = loss_mask[:, 1:].float()
    return (token_loss * weights).sum() / weights.sum().clamp(min=1)


@torch.no_grad()
def validation_loss(model, tokenized: list[list[int]], pad_id: int, batch_size: int = 128) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        chunk = tokenized[start : start + batch_size]
        batch = pack(chunk, [[] for _ in chunk], pad_id).to(next(model.parameters()).device)
        total += per_row_in_buckets(batch, lambda rows: row_token_losses(model, rows)).sum().item()
        count += batch.attention_mask[:, 1:].sum().item()
    return total / count


def build_tokenizer(profile: Profile, folder: Path, seed: int = world.PRETRAIN_SEED):
    """Train the BPE on 20k world reviews (closings and long reviews included) and save it."""
    tokenizer = train_tokenizer(world.pretraining_corpus(20_000, seed), profile.vocab_size)
    save_tokenizer(tokenizer, folder)
    return load_tokenizer(folder)


def pretrain(
    profile: Profile,
    out_dir: str | Path,
    config: PretrainConfig | None = None,
    tokenizer=None,
    device: torch.device | str = "cpu",
    resume: bool = True,
    progress: bool = True,
    stop_after_steps: int | None = None,
    callback: Callable[[dict], None] | None = None,
):
    """Train the profile's base model from scratch on world reviews and save it to ``out_dir``.

    Returns ``(model, summary)``; the summary (also written to ``out_dir/pretrain_summary.json``)
    has the parameter count, the history (``loss``, ``lr``, ``grad_norm`` per step, the
    ``validation_loss`` before training, every ``eval_every`` steps and at the end) and the wall time.

    A checkpoint is written every ``config.checkpoint_every`` steps to ``out_dir/checkpoint``; with
    ``resume=True`` a new call continues from it. ``stop_after_steps`` ends this call early (after
    saving a checkpoint), e.g. to train in slices on a machine that may disconnect; the summary
    then has ``"finished": False``. ``callback(record)`` runs after every step.

    With ``config.plateau_evaluations`` (the small profile) the run is cut short once the validation
    loss has stopped improving (``at_plateau``): it ends after a cooldown of ``plateau_cooldown``
    times the steps so far, its learning rate's cosine re-planned to end there (``planned_steps``).
    The summary's ``plateau_step`` says where the plateau was found, ``steps`` where the run ended.
    It trains in slices of ``eval_every`` steps to check.
    """
    config = config or PretrainConfig.for_profile(profile)
    out_dir = Path(out_dir)
    tokenizer = tokenizer or load_tokenizer(profile.tokenizer)
    seed_everything(config.seed)
    model = new_model(profile, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=config.seed).to(
        device
    )

    train = tokenize_reviews(tokenizer, world.pretraining_corpus(config.n_train_reviews, world.PRETRAIN_SEED))
    validation = tokenize_reviews(
        tokenizer, world.pretraining_corpus(config.n_validation_reviews, world.PRETRAIN_VALIDATION_SEED)
    )

    def loss_on_step(step: int) -> tuple[torch.Tensor, dict]:
        rows = batch_rows(step, len(train), config.batch_size, config.seed, drop_last=True)
        batch = pack([train[i] for i in rows], [[] for _ in rows], tokenizer.pad_token_id).to(device)
        return bucketed_language_model_loss(model, batch), {}

    if config.plateau_evaluations and not config.eval_every:
        raise CourseError("PretrainConfig plateau_evaluations needs validation losses to watch: set eval_every > 0")
    optimizer = adamw(model, config.learning_rate, config.weight_decay, betas=(0.9, 0.95))

    def run(resume_now: bool, steps_now: int | None, total_steps: int) -> list[dict]:
        return train_loop(
            model,
            optimizer,
            loss_on_step,
            steps=total_steps,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            max_grad_norm=config.max_grad_norm,
            name="pretraining",
            description=f"pretraining {profile.name}",
            evaluate=lambda: {"validation_loss": validation_loss(model, validation, tokenizer.pad_token_id)},
            eval_every=config.eval_every,
            checkpoint_dir=out_dir / "checkpoint",
            checkpoint_every=config.checkpoint_every,
            identity={"config": asdict(config), "profile": profile.name, "vocab_size": len(tokenizer)},
            resume=resume_now,
            stop_after_steps=steps_now,
            callback=callback,
            progress=progress,
        )

    started = time.perf_counter()
    if not config.plateau_evaluations:
        history = run(resume, stop_after_steps, config.steps)
    else:  # in slices that end at the evaluations (each saves a checkpoint the next resumes from, bit for bit)
        history = run(resume, 0, config.steps)  # no step: the checkpoint's history, or the start's evaluation
        budget, ran = (math.inf if stop_after_steps is None else stop_after_steps), 0
        while ran < budget and steps_done(history) < planned_steps(history, config):
            total = planned_steps(history, config)
            slice_steps = min(
                config.eval_every - steps_done(history) % config.eval_every, total - steps_done(history), budget - ran
            )
            history = run(True, slice_steps, total)
            ran += slice_steps
    total = planned_steps(history, config) if config.plateau_evaluations else config.steps
    if steps_done(history) < total:
        return model, {"finished": False, "step": steps_done(history), "history": history}

    validation_losses = [h["validation_loss"] for h in history if "validation_loss" in h]
    summary = {
        "finished": True,
        "profile": profile.name,
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "steps": steps_done(history),
        "plateau_step": plateau_step(history, config),
        "final_validation_loss": validation_losses[-1] if validation_losses else None,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "config": asdict(config),
        "history": history,
    }
    save_final(out_dir, model, "pretrain_summary.json", summary)
    return model, summary


def build_offline_world(
    profile: Profile, device: torch.device | str = "cpu", rebuild_tokenizer: bool = False, progress: bool = True
):
    """Everything the offline profile ships: the tokenizer (tiny profile only, or when missing),
    the prompt files and the base model. Returns ``(model, tokenizer, summary)``."""
    tokenizer_folder = Path(profile.tokenizer)
    if rebuild_tokenizer or not (tokenizer_folder / "tokenizer.json").exists():
        tokenizer = build_tokenizer(profile, tokenizer_folder)
    else:
        tokenizer = load_tokenizer(tokenizer_folder)
    write_prompt_files(data_dir())
    model, summary = pretrain(profile, profile.base_model, tokenizer=tokenizer, device=device, progress=progress)
    return model, tokenizer, summary


N_TRAIN_PROMPTS = 4096  # prompts for SFT demonstrations, preference pairs and PPO
N_EVAL_PROMPTS = 256  # held-out prompts every stage is scored on


def write_prompt_files(folder: Path) -> None:
    """``prompts/train.jsonl`` and ``prompts/eval.jsonl``: the world's prompts, one JSON per line."""
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    for split, n, seed in [
        ("train", N_TRAIN_PROMPTS, world.TRAIN_PROMPT_SEED),
        ("eval", N_EVAL_PROMPTS, world.EVAL_PROMPT_SEED),
    ]:
        lines = [json.dumps({"prompt": p}) for p in world.sample_prompts(n, seed)]
        (folder / "prompts" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
