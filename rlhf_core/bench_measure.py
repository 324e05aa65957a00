"""The clocks and counters of ``python -m rlhf_core bench``: timing arms interleaved, counting FLOPs,
measuring the device's peak.

An *arm* runs the units of one repeat (optimizer steps, iterations) from the same start each time,
calling ``tick`` after each; ``timed_arms`` runs several arms in turn, repeat after repeat, so a
slower moment of a shared machine falls on all of them alike. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on an untimed run of the same work; the peak is the
best FLOP/s of a large matmul in the same dtype, on the same device and threads.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .precision import autocast, resolve_precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOPS_COUNTED_BY = (
    "torch.utils.flop_counter.FlopCounterMode: matrix multiplies and attention "
    "(its CPU flash-attention kernels added), not elementwise work"
)


# ----- measuring -----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernels (it knows only the GPU ones)."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        },
    )


def timed(device: torch.device, call: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of ``call()``, the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - started, result


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """The best FLOP/s of a (size x size) @ (size x size) matmul (2 size^3 FLOPs), after two warm-ups."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    seconds = [timed(device, lambda: torch.mm(a, b))[0] for _ in range(repeats + 2)][2:]
    return 2 * size**3 / min(seconds)


Ticks = Callable[[], None]  # called by a run after each timed unit (an optimizer step)
Arm = Callable[[Ticks], None]  # runs the units of one repeat, from the same start each time


def ticking(device: torch.device) -> tuple[list[float], Ticks]:
    """A clock list and the tick that appends to it (after the device's work is done)."""
    stamps: list[float] = []

    def tick() -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    return stamps, tick


def per_step(stamps: list[float]) -> float:
    """Seconds per step from the end-of-step clocks; the first step (warm-up) is not counted."""
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def timed_arms(arms: dict[str, Arm], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each arm, ``repeats`` times, the arms interleaved (each repeat runs every
    arm once, in turn), so that a slower moment of the machine falls on all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, arm in arms.items():
            stamps, tick = ticking(device)
            arm(tick)
            seconds[name].append(per_step(stamps))
    return seconds


def counted_flops_per_step(arm: Arm) -> float:
    """FLOPs per step of ``arm``, counted on an untimed run (the first step excluded, as in timing)."""
    counter = flop_counter()
    totals: list[int] = []
    with counter:
        arm(lambda: totals.append(counter.get_total_flops()))
    return (totals[-1] - totals[0]) / (len(totals) - 1)


def spread(seconds: list[float]) -> dict[str, float]:
    """Median, min and max of the repeats' seconds."""
    return {"seconds": statistics.median(seconds), "seconds_min": min(seconds), "seconds_max": max(seconds)}


def device_name(device: torch.device, threads: int | None) -> str:
    """The machine in words: the GPU's name, or the CPU's model, cores and the threads used."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    model = names[0] if names else platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} thread(s) per arm ({device.type})"


def transformers_ms_per_decode_step(
    model, tokenizer, prompts: list[str], max_new_tokens: int, repeats: int, seed: int
) -> float:
    """The peer of our decoding loop (``rlhf_core.generation``): ``transformers``' own ``generate`` on
    the same model and prompts (left-padded), sampling at temperature 1 from the whole vocabulary, up to
    the same number of new tokens, under the same autocast; milliseconds per decode step, the median
    over ``repeats`` (its samples differ from ours, so the step is the unit compared)."""
    device = next(model.parameters()).device
    left_padded = copy.copy(tokenizer)
    left_padded.padding_side = "left"
    encoded = left_padded(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
    settings = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }

    def sample() -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad(), autocast(device, resolve_precision(None, device)):
            return model.generate(**encoded, **settings)

    sample()  # warm-up
    per_step = []
    for _ in range(repeats):
        seconds, output = timed(device, sample)
        per_step.append(1000 * seconds / (output.shape[1] - encoded["input_ids"].shape[1]))
    return statistics.median(per_step)
