"""What every training loop of the course shares: the optimizer, the learning-rate schedule, the
NaN guard, and checkpoints that let an interrupted run (a Colab disconnect) resume to the same
result. ``rlhf_core.loop`` puts them together for pretraining, SFT, the reward model and DPO; the
PPO loop (``rlhf_core.rlhf``) uses them directly.

A checkpoint folder holds:

    model.safetensors        the trained weights (plus config.json, via ``save_pretrained``); for a
                             LoRA model, adapters.safetensors instead: the adapters alone (``rlhf_core.lora``)
    training_state.pt        optimizer state, step, random-number-generator states and history,
                             read back with ``torch.load(weights_only=True)`` (no pickled code)

Resuming restores all of it, so the run continues as if it had never stopped: the same batches,
the same updates, the same final weights (the tests check this bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model

from . import distributed
from .lora import is_lora, load_adapters, save_adapters
from .precision import grad_scaler


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite: training stops rather than silently destroying the model."""


def check_finite(value: torch.Tensor | float, name: str, step: int, unit: str = "step") -> None:
    """Stop the run with the step (or PPO ``unit="iteration"``) and the quantity named when
    ``value`` is NaN or inf."""
    number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(number):
        raise NonFiniteLossError(
            f"{name} is {number} at {unit} {step}: training stopped. Usual causes: a learning rate "
            f"too high, a reward or advantage that exploded, log-probs of an impossible token."
        )


def cosine_with_warmup(
    step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_fraction: float = 0.1
) -> float:
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine decay to
    ``final_fraction * peak_lr`` at ``total_steps``. A pure function of the step, so resuming
    needs no scheduler state."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in two groups: matrices (and embeddings) decayed;
    biases and LayerNorm gains (the 1-d parameters) not, as in GPT-2 and nanoGPT."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=learning_rate,
        betas=betas,
    )


def backward_and_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    parameters,
    max_grad_norm: float,
) -> torch.Tensor:
    """One optimizer step on ``loss``: zero the gradients, backward, clip, step. Every trainer's
    update goes through here (``loop.train_loop``, PPO's ``rlhf.update_epochs``, the critic-free loop).

    ``parameters``: the parameters whose gradients are clipped together to a global L2 norm of
    ``max_grad_norm``, or a list of such lists, each clipped on its own (PPO clips the policy and
    the value model's own parameters separately). Returns the norm before clipping: a scalar, or
    one per list.

    ``scaler``: the run's ``precision.grad_scaler``. Enabled (fp16), it multiplies the loss by its
    scale before ``backward`` (small gradients survive float16's range), unscales the gradients
    before clipping (the norm is the true gradients'), and skips the step when they overflowed,
    shrinking the scale: the norm returned is then inf or nan, and the caller must not stop for
    it. Disabled or None (fp32, bf16), this is exactly ``zero_grad``, ``backward``, clip, ``step``.

    Under ``accelerate launch`` (``rlhf_core.distributed``) the gradients are averaged over the
    processes right after ``backward``, before anything reads them: every process then unscales, clips
    and steps on the same gradients (and skips the same fp16 overflows), so their weights stay equal.
    """
    scaler = scaler if scaler is not None else grad_scaler("cpu", "fp32")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    distributed.average_gradients(optimizer)  # a no-op in a single process
    scaler.unscale_(optimizer)  # a no-op when disabled; clipping must see unscaled gradients
    parameters = list(parameters)
    several = bool(parameters) and not isinstance(parameters[0], torch.Tensor)
    groups = parameters if several else [parameters]
    norms = [torch.nn.utils.clip_grad_norm_(list(group), max_grad_norm) for group in groups]
    scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
    scaler.update()
    return torch.stack(norms) if several else norms[0]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state a training loop draws from, as tensors and plain values."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": torch.tensor(np.random.get_state()[1].astype(np.int64)),
        "numpy_position": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["generator"] = generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_position"], 0, 0.0))
    python_state = json.loads(states["python"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "generator" in states:
        generator.set_state(states["generator"])


def save_checkpoint(
    folder: str | Path,
    model,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    history: list[dict],
    generator: torch.Generator | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a resumable checkpoint atomically (a half-written folder never replaces a good one).

    Several processes (``rlhf_core.distributed``): all of them call it, the main one writes, and none
    returns before the folder is complete (the random states saved are the main process's)."""
    folder = Path(folder)
    if distributed.is_main_process():
        _write_checkpoint(folder, model, optimizer, step, history, generator, extra)
    distributed.wait_for_everyone()
    return folder


def _write_checkpoint(folder: Path, model, optimizer, step: int, history, generator, extra) -> None:
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    if is_lora(model):  # the adapters only: the frozen base is the stage's input, already on disk
        save_adapters(model, partial)
    else:
        model.save_pretrained(partial, safe_serialization=True)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_states(generator),
        "history": json.dumps(history),
        "extra": extra or {},
    }
    torch.save(state, partial / "training_state.pt")
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)


def load_checkpoint(
    folder: str | Path, model, optimizer: torch.optim.Optimizer | None, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """Load weights, optimizer and random states saved by ``save_checkpoint`` into the given
    objects; returns ``{"step", "history", "extra"}``."""
    folder = Path(folder)
    if is_lora(model):
        load_adapters(model, folder)
    else:
        _load_weights(model, folder)
    state = torch.load(folder / "training_state.pt", weights_only=True)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    restore_rng_states(state["rng"], generator)
    return {"step": state["step"], "history": json.loads(state["history"]), "extra": state["extra"]}


def _load_weights(model, folder: Path) -> None:
    """``model.safetensors`` into ``model``, every weight accounted for."""
    missing, unexpected = load_model(model, folder / "model.safetensors", strict=False)
    # save_pretrained stores tied weights once (GPT-2's LM head is its token embedding)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    stored = {parameters[name].data_ptr() for name in parameters if name not in missing}
    untied_missing = [name for name in missing if name in parameters and parameters[name].data_ptr() not in stored]
    if unexpected or untied_missing:
        raise ValueError(
            f"checkpoint {folder} does not match the model: missing {untied_missing}, unexpected {sorted(unexpected)}"
        )


class InterruptGuard:
    """Holds a Ctrl-C (SIGINT, or a notebook's interrupt button) that arrives while ``busy``: the
    handler only sets ``requested``, the training loop finishes its step or iteration, saves a
    checkpoint of whole steps only, says where the next run resumes and stops. A second Ctrl-C, or
    one while not busy, interrupts at once. Every trainer of the course (``loop.train_loop``, PPO,
    the critic-free loop) uses it. Outside the main thread signals cannot be caught: nothing is held.
    Nor under ``accelerate launch``: the processes would finish at different steps, and a checkpoint
    needs all of them; they stop at once, and the next run resumes from the last periodic checkpoint."""

    def __init__(self):
        self.busy = False  # inside an iteration
        self.requested = False  # a Ctrl-C arrived while busy
        self.previous = None  # the SIGINT handler to restore; None: ours was never installed

    def __enter__(self) -> InterruptGuard:
        if distributed.is_distributed():  # a held Ctrl-C would end the processes at different steps
            return self
        try:
            previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            return self
        # None: a handler installed outside Python, which cannot be put back; Python's usual one then
        self.previous = signal.default_int_handler if previous is None else previous
        return self

    def _handle(self, signum, frame) -> None:
        if self.busy and not self.requested:
            self.requested = True
            return
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
