"""The one training loop of the course: pretraining, SFT, the reward model and DPO all run it.

Each trainer says what is particular to it, the loss of a step; the loop does all the rest:

    for each step:
        set the learning rate          linear warmup, then cosine decay (a pure function of the step)
        loss, stats = loss_on_step(step)
        check the loss is finite       a NaN stops the run with the step named
        backward, clip, AdamW step     ``training.backward_and_step`` (loss scaling for fp16)
        log a record                   step, loss, lr, grad_norm, the trainer's stats
        evaluate                       every ``eval_every`` steps, and after the last one
        checkpoint                     every ``checkpoint_every`` steps (atomic, resumable)

The trainer builds its batch *from the step* (``batch_rows``), so a resumed run draws exactly the
batches the interrupted one would have drawn, and the checkpoint restores everything else
(weights, optimizer, random states, history): the resumed run ends with the same weights, bit for
bit on CPU. A checkpoint records an ``identity`` (the trainer's config and a fingerprint of its
data); a checkpoint of another identity is never resumed.

Ctrl-C (or a notebook's interrupt button) finishes the current step, saves a checkpoint, prints
where the next run resumes from, and stops with ``KeyboardInterrupt``; press it twice to stop at
once without saving.

``precision`` (``rlhf_core.precision``: fp32, bf16 or fp16; None: ``RLHF_PRECISION``, else auto, which
is fp32 on a CPU) decides how the forward passes run: ``loss_on_step`` and ``evaluate`` are called
under ``autocast``, and fp16's loss scale is saved in the checkpoint with the rest.

Under ``accelerate launch`` (``rlhf_core.distributed``) every process runs this loop: the weights
start as the main process's, ``loss_on_step`` returns this process's share of the global batch's
loss (``distributed.share_of_mean``), the loss logged is the global one (the mean of the shares) and
``backward_and_step`` averages the gradients. Only the main process writes and shows progress.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .lora import save_model
from .precision import autocast, grad_scaler, resolve_precision
from .tokenizer import save_tokenizer
from .training import (
    InterruptGuard,
    backward_and_step,
    check_finite,
    cosine_with_warmup,
    load_checkpoint,
    save_checkpoint,
    set_learning_rate,
)

LossOnStep = Callable[[int], tuple[torch.Tensor, dict]]  # step -> (loss to minimise, stats to log)


def train_loop(
    model,
    optimizer: torch.optim.Optimizer,
    loss_on_step: LossOnStep,
    *,
    steps: int,
    learning_rate: float,
    warmup_steps: int,
    max_grad_norm: float,
    name: str,
    evaluate: Callable[[], dict] | None = None,
    eval_every: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    identity: dict | None = None,
    resume: bool = True,
    stop_after_steps: int | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    description: str | None = None,
    precision: str | None = None,
) -> list[dict]:
    """Train ``model`` for ``steps`` optimizer steps; returns the history, one dict per step.

    ``loss_on_step(step)`` returns the step's loss (a scalar tensor with gradients) and a dict of
    numbers to log. A record is ``{"step": steps done, "loss", "lr", "grad_norm" (before
    clipping), **stats}``, plus ``evaluate()``'s numbers every ``eval_every`` steps (0: only after
    the last step). With ``evaluate``, row 0 holds its numbers before training. ``name`` names the
    run in error messages ("SFT loss is nan at step 3"), ``description`` labels the progress bar.

    With ``checkpoint_dir``: a checkpoint every ``checkpoint_every`` steps (0: never) and on
    Ctrl-C; with ``resume`` a checkpoint of the same ``identity`` found there is continued.
    ``stop_after_steps`` ends this call after that many steps, saving a checkpoint (to train in
    slices, or to test resuming). ``callback(record)`` runs after every step. ``precision``: see the
    module docstring; with fp16 a step whose gradients overflowed is skipped (its ``grad_norm`` is inf).
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    identity_text = json.dumps(identity, sort_keys=True, default=str)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    scaler = grad_scaler(device, precision)
    history, start = _resumed(checkpoint_dir, identity_text, model, optimizer, scaler) if resume else ([], 0)
    distributed.broadcast_parameters(model)  # several processes start from the same weights (alone: nothing)

    def save(at_step: int) -> None:
        if checkpoint_dir is not None:
            save_checkpoint(
                checkpoint_dir,
                model,
                optimizer,
                at_step,
                history,
                extra={"identity": identity_text, "scaler": scaler.state_dict()},
            )

    def evaluated() -> dict:
        with autocast(device, precision):
            return evaluate()

    with (
        tqdm(total=steps, initial=start, desc=description or name, disable=not distributed.shows(progress)) as bar,
        InterruptGuard() as interrupt,
    ):
        interrupt.busy = True  # a first Ctrl-C is held until the step ends
        if start == 0 and evaluate is not None:
            history = [{"step": 0, **evaluated()}]  # before training: the baseline of every curve
        for step in range(start, steps):
            if stop_after_steps is not None and step - start >= stop_after_steps:
                save(step)
                break
            model.train()
            lr = cosine_with_warmup(step, steps, warmup_steps, learning_rate)
            set_learning_rate(optimizer, lr)
            with autocast(device, precision):
                loss, stats = loss_on_step(step)
            global_loss = distributed.mean_across(loss.detach())  # the global batch's (alone: ``loss.item()``)
            check_finite(global_loss, f"{name} loss", step)
            grad_norm = backward_and_step(loss, optimizer, scaler, model.parameters(), max_grad_norm)
            if not scaler.is_enabled():  # fp16 skips an overflowing step and retries at a smaller scale
                check_finite(grad_norm, f"{name} gradient norm", step)

            record = {"step": step + 1, "loss": global_loss, "lr": lr, "grad_norm": float(grad_norm), **stats}
            if evaluate is not None and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
                record.update(evaluated())
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if callback is not None:
                callback(record)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save(step + 1)
            if interrupt.requested:
                save(step + 1)
                then = f"resumes from {checkpoint_dir}" if checkpoint_dir is not None else "starts over (no checkpoint)"
                tqdm.write(f"{name}: interrupted at step {step + 1} of {steps}; the next run {then}")
                raise KeyboardInterrupt
    model.eval()
    return history


def _resumed(
    checkpoint_dir: Path | None, identity_text: str, model, optimizer, scaler: torch.amp.GradScaler | None = None
) -> tuple[list[dict], int]:
    """``(history, step)`` of the checkpoint in ``checkpoint_dir``, loaded into ``model``,
    ``optimizer`` and ``scaler`` (fp16's loss scale); ``([], 0)`` when there is none or it was made
    with another identity."""
    if checkpoint_dir is None or not (checkpoint_dir / "training_state.pt").exists():
        return [], 0
    saved = torch.load(checkpoint_dir / "training_state.pt", weights_only=True)["extra"].get("identity")
    if saved != identity_text:
        warnings.warn(
            f"the checkpoint in {checkpoint_dir} was made with another config or other data: "
            f"ignoring it and starting over",
            stacklevel=3,
        )
        return [], 0
    restored = load_checkpoint(checkpoint_dir, model, optimizer)
    if scaler is not None and scaler.is_enabled() and restored["extra"].get("scaler"):
        scaler.load_state_dict(restored["extra"]["scaler"])
    return restored["history"], restored["step"]


def steps_per_epoch(n_rows: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over ``n_rows`` rows (``drop_last``: the incomplete last one is skipped)."""
    return n_rows // batch_size if drop_last else math.ceil(n_rows / batch_size)


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int, drop_last: bool = False) -> list[int]:
    """The rows of ``step``'s batch: epoch e is a random permutation drawn from (seed, e) alone, cut
    into batches of ``batch_size`` (the last one smaller, or skipped with ``drop_last``). A pure
    function of the step, so a resumed run draws the same batches with no random state."""
    per_epoch = steps_per_epoch(n_rows, batch_size, drop_last)
    if per_epoch == 0:
        raise ValueError(f"{n_rows} rows make no batch of {batch_size}")
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()


def steps_done(history: list[dict]) -> int:
    """Optimizer steps a history records (0 for an empty one)."""
    return history[-1]["step"] if history else 0


def fingerprint(value) -> str:
    """A short hash of ``value`` as JSON (the training records, say): a checkpoint's identity holds
    this instead of the data itself. What JSON cannot write (a NumPy number) counts by its ``str``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_final(out_dir: str | Path, model, summary_file: str, summary: dict, tokenizer=None) -> Path:
    """The end of a finished run: the weights (and the tokenizer) in ``out_dir``, then the summary,
    written last and atomically (its presence means "complete"), then the checkpoint removed. Several
    processes: the main one writes, and none returns before it is done."""
    out_dir = Path(out_dir)
    if distributed.is_main_process():
        _write_final(out_dir, model, summary_file, summary, tokenizer)
    distributed.wait_for_everyone()
    return out_dir


def _write_final(out_dir: Path, model, summary_file: str, summary: dict, tokenizer) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, out_dir)  # a LoRA model's adapters merged in: a plain GPT-2 folder (rlhf_core.lora)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    partial = out_dir / f"{summary_file}.{os.getpid()}.partial"
    partial.write_text(json.dumps(summary, indent=1))
    partial.replace(out_dir / summary_file)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # the final weights replace the resumable state
