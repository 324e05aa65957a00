"""Mixed precision on CUDA: bfloat16 where the card has it, float16 with loss scaling where not.

Matrix multiplies in 16 bits run at the tensor cores' rate (on a T4, float16 is about eight times
float32); the weights, the optimizer state and everything accumulated (log-probs, KL, losses) stay in
float32. ``torch.autocast`` picks the dtype per operation: matmuls in 16 bits, reductions and
``log_softmax`` in float32. float16's narrow range can underflow small gradients, so its backward
pass runs on a loss multiplied by a scale that ``torch.amp.GradScaler`` adapts (Micikevicius et al.
2018, "Mixed precision training"); bfloat16 has float32's range and needs no scaling.

The choice is one word, ``precision``:

    auto   bf16 on a CUDA card that supports it natively, fp16 on one that does not (T4), fp32 elsewhere
    fp32   no autocast (the CPU path, and the reference every mixed run is compared with)
    bf16   autocast to bfloat16 (CUDA; on a CPU, autocast to bfloat16 is allowed, for tests)
    fp16   autocast to float16 with a GradScaler (CUDA only)

from the argument, else the ``RLHF_PRECISION`` environment variable, else ``auto``
(``resolve_precision``). Each trainer resolves it once, for its model's device, and passes the
resolved word down: its forward passes run under ``autocast(device, precision)`` and its optimizer
steps go through ``rlhf_core.training.backward_and_step`` with the ``grad_scaler(device, precision)``.
What must stay exact is computed in float32 whatever the forward pass ran in: log-probs take
``logits.float()`` before the log-softmax, scores and values are cast with ``.float()``, the losses
follow. On a CPU ``auto`` is fp32: no autocast, a disabled scaler, the same numbers as without this module.

The command line's ``--precision`` sets ``RLHF_PRECISION`` for the run (``precision_setting``), so every
stage, the ones built by ``rlhf_core.stages`` included, sees the same choice; a notebook sets the
variable itself. The same word maps onto Hugging Face ``accelerate``'s ``mixed_precision`` ("no",
"bf16", "fp16") when a run is launched through it (``accelerate_mixed_precision``): accelerate then
owns autocast and loss scaling, and the trainers run with ``precision="fp32"`` inside it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .errors import CourseError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_VARIABLE = "RLHF_PRECISION"


def _native_bf16() -> bool:
    """True when the CUDA card computes in bfloat16 itself (Ampere and later), not by emulation."""
    try:  # torch >= 2.3 counts emulation as support unless told not to
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for this device: the argument, else ``RLHF_PRECISION``, else auto
    (see the module docstring). An unknown word, or fp16 off CUDA, is a one-line ``CourseError``."""
    if precision:
        where, chosen, undo = f"precision {precision!r}", precision, "use --precision auto"
    else:
        chosen = os.environ.get(PRECISION_VARIABLE) or "auto"  # set but empty counts as unset
        where, undo = f"{PRECISION_VARIABLE}={chosen}", f"unset {PRECISION_VARIABLE}"
    chosen = chosen.strip().lower()
    if chosen not in PRECISIONS:
        raise CourseError(f"{where}: not a precision; use one of {', '.join(PRECISIONS)} (or {undo})")
    device = torch.device(device)
    if chosen == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if _native_bf16() else "fp16"
    if chosen == "fp16" and device.type != "cuda":
        raise CourseError(
            f"{where}: float16 with loss scaling needs a CUDA device and this run is on {device}; "
            f"use fp32 (or bf16, which a CPU can autocast to)"
        )
    return chosen


def autocast(device: torch.device | str, precision: str):
    """The context the forward passes run in: ``torch.autocast`` for bf16/fp16, nothing for fp32.
    ``precision`` is a resolved word (``resolve_precision``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def model_autocast(model: torch.nn.Module, precision: str | None = None):
    """``autocast`` on ``model``'s device, ``precision`` resolved there (None: ``RLHF_PRECISION``, else
    auto). For a function that runs forward passes on its own (sampling, scoring, measuring)."""
    device = next(model.parameters()).device
    return autocast(device, resolve_precision(precision, device))


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16; a disabled scaler (a plain ``backward`` and ``step``) otherwise."""
    device_type = torch.device(device).type
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    return torch.cuda.amp.GradScaler(enabled=precision == "fp16")  # torch < 2.3: CUDA's own class


@contextlib.contextmanager
def precision_setting(precision: str | None) -> Iterator[None]:
    """Within the block, ``RLHF_PRECISION`` is ``precision`` (None: left as it is): how the command
    line's ``--precision`` reaches every trainer of a run, those the stage layer builds included."""
    if not precision:
        yield
        return
    previous = os.environ.get(PRECISION_VARIABLE)
    os.environ[PRECISION_VARIABLE] = precision
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PRECISION_VARIABLE, None)
        else:
            os.environ[PRECISION_VARIABLE] = previous


def accelerate_mixed_precision(precision: str) -> str:
    """The same choice in ``accelerate``'s words."""
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
