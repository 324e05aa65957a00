"""Mixed precision on CUDA: bfloat16 where the card has it, float16 with loss scaling where not.

Matrix multiplies in 16 bits run at the tensor cores' rate (on a T4, float16 is about eight times
float32); the weights, the optimizer state and everything accumulated (log-probs, KL, losses) stay in
float32. ``torch.autocast`` picks the dtype per operation: matmuls in 16 bits, reductions and
``log_softmax`` in float32. float16's narrow range can underflow small gradients, so its backward
pass runs on a loss multiplied by a scale that ``torch.amp.GradScaler`` adapts (Micikevicius et al.
2018, "Mixed precision training"); bfloat16 has float32's range and needs no scaling.

The choice is one word, ``precision``:

    auto   bf16 on a CUDA card that supports it, fp16 on one that does not (T4), fp32 elsewhere
    fp32   no autocast (the CPU path, and the reference every mixed run is compared with)
    bf16   autocast to bfloat16 (CUDA; on a CPU, autocast to bfloat16 is allowed for tests)
    fp16   autocast to float16 with a GradScaler (CUDA only)

from the argument, else the ``RLHF_PRECISION`` environment variable, else ``auto``. The same word maps
onto Hugging Face ``accelerate``'s ``mixed_precision`` ("no", "bf16", "fp16") when a run is launched
through it (``accelerate_mixed_precision``).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import CourseError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for this device (see the module docstring)."""
    chosen = (precision or os.environ.get("RLHF_PRECISION") or "auto").strip().lower()
    if chosen not in PRECISIONS:
        raise CourseError(f"precision {chosen!r} is not one of {', '.join(PRECISIONS)}: use --precision auto")
    device = torch.device(device)
    if chosen == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if chosen == "fp16" and device.type != "cuda":
        raise CourseError(f"precision fp16 needs a CUDA device (this run is on {device}): use --precision fp32")
    return chosen


def autocast(device: torch.device | str, precision: str):
    """The context the forward passes run in: ``torch.autocast`` for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16; a disabled scaler (a plain ``backward`` and ``step``) otherwise."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def accelerate_mixed_precision(precision: str) -> str:
    """The same choice in ``accelerate``'s words."""
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
