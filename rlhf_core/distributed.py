"""Data parallelism: every trainer of the course on several processes, through Hugging Face ``accelerate``.

    accelerate launch --cpu --num_processes 2 -m rlhf_core run --profile tiny     two CPU processes
    accelerate launch --num_processes 2 -m rlhf_core run                          two GPUs, one process each

Each process holds a full copy of every model. A step's global batch is cut into one share per
process (``shard``); each process runs forward and backward on its share; the gradients are then
averaged over the processes (``average_gradients``) and every process takes the same optimiser step,
so the copies stay identical, bit for bit. ``accelerate.PartialState`` reads what ``accelerate launch``
(or ``torchrun``) put in the environment and sets up the process group; this module never creates
one itself. With one process (a notebook, ``python -m rlhf_core``) no helper imports ``accelerate``
or communicates: each returns its argument, and every number of the course is what it was, bit for bit.

**Why not ``DistributedDataParallel``.** DDP wraps a model: the trainers would then have to reach the
model's own attributes (``config``, ``transformer``, ``generate``, ``save_pretrained``) through
``.module``, and PPO's one optimiser steps two models (policy and value model, maybe with a shared
trunk) that DDP would wrap separately. Averaging the gradients after ``backward``, in the one function
every optimiser step goes through (``training.backward_and_step``), keeps every model a plain
``transformers`` model and every trainer's code as it reads alone. The cost: DDP overlaps the gradient all-reduce with
the backward pass (bucket by bucket); here one all-reduce of one flat buffer follows it. For the
course's models that is a small share of a step.

**Exact, for SFT, the reward model and DPO.** Their batches are a pure function of the step
(``loop.batch_rows``), so every process knows the whole global batch and takes its rows ``[i::P]``.
Each process's loss is its share of the global mean (``share_of_mean``): the sum over its rows (or
tokens) divided by the global batch's count and multiplied by P, so that the averaged gradient is the
gradient of the global batch's mean, the loss of one process with the same batch. The logged loss
and statistics are the global ones (``mean_across``, ``global_means``).

**PPO and the critic-free loop.** ``prompts_per_iteration`` and ``minibatch_size`` are global: each
process samples its share of the prompts (``split_config``), with its own seeds (``process_seed``), so
the processes draw different prompts and different responses; a critic-free group (a prompt's k
samples) stays whole on one process. Advantage whitening uses the statistics of every process's tokens
(``masked_whiten``). A minibatch loss that is a mean over its tokens (PPO, the "token" aggregation)
becomes the mean of the processes' token means: the global mean when the processes hold as many
tokens, as with DDP. The logged numbers are averaged over the processes (``mean_record``; timings: the
slowest process's), so every process keeps the same history and the same adaptive KL coefficient.
A checkpoint holds every process's random generators (``process_rng_states``): a resumed run draws
what the interrupted one would have drawn, in each process.

**Who writes.** Every process runs the same code, through the same stages, and takes the same cache
decisions: the main process's (``on_main``). Only the main process writes (checkpoints, caches,
summaries, reports) and shows progress bars; the others wait for it (``wait_for_everyone``) and then
read what it wrote. Sampling outside training (the pipeline's measurements, the preference pairs) is
seeded as one stream of random numbers: split over the processes it would draw other responses than
one process does, so the main process samples alone (``on_main``, with the others' CPU threads) and
hands the result to the others. Scoring and held-out evaluation are split by batch (``map_chunks``):
the numbers of one process, bit for bit.

On CPUs, ``accelerate launch --cpu --num_processes N`` starts one process where N were meant;
``rlhf_core.launch`` starts the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from functools import cache

import torch

from .errors import CourseError

SEED_STRIDE = 1_000_003  # process i draws from seed + i * SEED_STRIDE: process 0 keeps the single-process seeds
TIMEOUT = timedelta(hours=2)  # how long a process waits for the others (the main one sampling alone, say)
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes the launcher started (1 when none did): read from the environment only."""
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@cache
def _launched_state():
    """accelerate's ``PartialState`` (which joins the process group) when a launcher started several
    processes; None for a plain single process, which never imports accelerate."""
    if launched_world_size() <= 1:
        return None
    from accelerate import PartialState

    cpu = truthy(os.environ.get("ACCELERATE_USE_CPU")) or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=TIMEOUT)
    return state if state.num_processes > 1 else None


_alone = False  # True while the main process computes something by itself (``on_main``)


def _state():
    """The launched state, or None: alone, or the main process computing by itself (``on_main``)."""
    return None if _alone else _launched_state()


# ----- who am I -----------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True in a run of several processes."""
    return _state() is not None


def num_processes() -> int:
    state = _state()
    return 1 if state is None else state.num_processes


def process_index() -> int:
    state = _state()
    return 0 if state is None else state.process_index


def is_main_process() -> bool:
    """True in the process that writes files and shows progress (the only one, alone)."""
    return process_index() == 0


def shows(progress: bool) -> bool:
    """Whether to show a progress bar or a line asked for with ``progress``: on the main process only."""
    return progress and is_main_process()


def device() -> torch.device | None:
    """This process's device when launched (``cuda:<local rank>`` on GPUs, ``cpu``); None alone."""
    state = _launched_state()  # the same inside ``on_main``
    if state is None:
        return None
    device = torch.device(state.device)
    return torch.device("cpu") if device.type == "cpu" else device  # accelerate says "cpu:0"


def wait_for_everyone() -> None:
    """A barrier: returns once every process has reached it (at once when alone)."""
    if is_distributed():
        _state().wait_for_everyone()


# ----- splitting the work -------------------------------------------------------------------------
def shard(rows: Sequence) -> list:
    """This process's share of a global batch's rows: ``rows[i::P]`` (all of them when alone)."""
    return list(rows[process_index() :: num_processes()])


def local_count(total: int, what: str) -> int:
    """This process's share of ``total`` (a global batch size); a ``CourseError`` naming ``what``
    when it does not divide evenly (every process must take as many optimiser steps)."""
    processes = num_processes()
    if total % processes:
        raise CourseError(
            f"{what}={total} does not split over {processes} processes: use a multiple of {processes}, "
            f"or launch a number of processes that divides it"
        )
    return total // processes


def require_rows(batch_size: int, what: str) -> None:
    """A ``CourseError`` naming ``what`` when a global batch of ``batch_size`` rows leaves a process none."""
    if batch_size < num_processes():
        raise CourseError(
            f"{what}={batch_size} leaves some of the {num_processes()} processes without a row: "
            f"use a batch of at least {num_processes()}, or fewer processes"
        )


def empty_share(model: torch.nn.Module) -> torch.Tensor:
    """The loss of a process whose share of a (last, smaller) batch is empty: zero, with a zero
    gradient for every trainable parameter, so that it still takes part in the gradient average."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def split_config(config, fields: Sequence[str]):
    """``config`` with the global batch sizes ``fields`` replaced by this process's share of them."""
    if not is_distributed():
        return config
    name = type(config).__name__
    return replace(config, **{field: local_count(getattr(config, field), f"{name} {field}") for field in fields})


def process_seed(seed: int) -> int:
    """This process's seed for what must differ between processes (prompt draws, token sampling)."""
    return seed + SEED_STRIDE * process_index()


def map_chunks(count: int, compute: Callable[[int], object], progress: bool = False, desc: str | None = None) -> list:
    """``[compute(0), ..., compute(count - 1)]`` on every process, chunk i computed by process i % P.

    Each chunk is computed exactly as one process would, so the results are the single-process
    ones, bit for bit; they must be picklable and on the CPU (they travel between processes)."""
    mine = range(process_index(), count, num_processes())
    if shows(progress):
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc=desc)
    results = {index: compute(index) for index in mine}
    if not is_distributed():
        return [results[index] for index in range(count)]
    merged = {}
    for part in gather_objects([results]):
        merged.update(part)
    return [merged[index] for index in range(count)]


# ----- communication ------------------------------------------------------------------------------
def gather_objects(items: list) -> list:
    """Every process's ``items`` (picklable), concatenated in process order, on every process."""
    if not is_distributed():
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def on_main(compute: Callable[[], object]):
    """``compute()`` run by the main process alone, its result (picklable) given to every process.

    For a decision no process may take differently (is a cached stage finished?) and for what cannot be
    split without changing its numbers: sampling responses, seeded as one stream (the pipeline's
    measurements, preference pairs). Inside ``compute`` every helper of this module acts as in a single
    process; the other processes wait, idle, and on a CPU lend the main one their threads meanwhile."""
    global _alone
    if not is_distributed():
        return compute()
    from accelerate.utils import broadcast_object_list

    result = None
    if is_main_process():
        threads = torch.get_num_threads()
        if device().type == "cpu":  # the waiting processes' cores (on this machine) are free
            torch.set_num_threads(threads * int(os.environ.get("LOCAL_WORLD_SIZE", num_processes())))
        _alone = True
        try:
            result = compute()
        finally:
            _alone = False
            torch.set_num_threads(threads)
    return broadcast_object_list([result], from_process=0)[0]


def _to_device(values: torch.Tensor) -> torch.Tensor:
    return values.to(_state().device)  # NCCL only moves CUDA tensors


def sum_across(value: torch.Tensor | float) -> torch.Tensor | float:
    """The sum over the processes (a tensor keeps its shape and device; a number stays a number)."""
    if not is_distributed():
        return value
    tensor = torch.as_tensor(value, dtype=torch.float64 if not isinstance(value, torch.Tensor) else None)
    summed = _to_device(tensor.detach().clone())
    torch.distributed.all_reduce(summed)
    if isinstance(value, torch.Tensor):
        return summed.to(value.device)
    return float(summed)


def mean_across(value: torch.Tensor | float) -> float:
    """The mean over the processes of one number (alone: the number itself, as a float)."""
    if not is_distributed():
        return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    return float(sum_across(torch.as_tensor(float(value), dtype=torch.float64))) / num_processes()


def share_of_mean(values: torch.Tensor, global_count: int) -> torch.Tensor:
    """The loss this process steps on for the global batch's mean of per-item ``values`` (this
    process's items): ``values.mean()`` alone (the mean of the whole batch); with P processes
    ``values.sum() * P / global_count``, whose gradients, averaged over the processes, are those of
    the global mean. The global mean itself is ``mean_across`` of the shares."""
    if not is_distributed():
        return values.mean()
    return share_of_sum(values.sum(), global_count)


def share_of_sum(total: torch.Tensor, global_count: int | float) -> torch.Tensor:
    """``share_of_mean`` for a loss given as this process's sum (SFT's token sum) over a global count."""
    return total * num_processes() / global_count


def global_means(columns: dict[str, torch.Tensor], global_count: int | None = None) -> dict[str, float]:
    """The global batch's mean of each column of per-item values (this process's items): the plain
    means alone; with P processes one all-reduce of the sums, divided by ``global_count``."""
    if not is_distributed():
        return {name: float(values.float().mean()) for name, values in columns.items()}
    sums = torch.stack([values.detach().float().sum() for values in columns.values()]).double()
    totals = sum_across(sums).cpu()
    return {name: float(total) / global_count for name, total in zip(columns, totals)}


def mean_record(record: dict) -> dict:
    """An iteration's logged numbers, the same on every process: floats averaged over the processes,
    ``seconds_*`` the slowest process's, anything else (the iteration number) as it is."""
    if not is_distributed():
        return record
    names = [name for name, value in record.items() if isinstance(value, float)]
    local = torch.tensor([record[name] for name in names], dtype=torch.float64)
    table = torch.stack([torch.as_tensor(row, dtype=torch.float64) for row in gather_objects([local])])  # (P, n)
    combined = {
        name: float(table[:, column].max() if name.startswith("seconds_") else table[:, column].mean())
        for column, name in enumerate(names)
    }
    return {name: combined.get(name, value) for name, value in record.items()}


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``ppo.masked_whiten`` with the mean and the (unbiased) variance of every process's real
    tokens: the advantages are scaled alike on every process, whatever the split of the batch."""
    from . import ppo

    if not is_distributed():
        return ppo.masked_whiten(values, mask)
    mask = mask.to(values.dtype)
    kept = torch.where(mask > 0, values, torch.zeros_like(values))
    total, count = sum_across(torch.stack([kept.sum(), mask.sum()]).double()).tolist()
    mean = total / count
    squares = sum_across(torch.where(mask > 0, (values - mean) ** 2, torch.zeros_like(values)).sum().double())
    variance = float(squares) / count * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(torch.tensor(variance + eps, dtype=values.dtype, device=values.device))
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimiser steps, each once, in a fixed order."""
    seen, parameters = set(), []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if id(parameter) not in seen:
                seen.add(id(parameter))
                parameters.append(parameter)
    return parameters


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """After ``backward``: every gradient the optimiser will use, averaged over the processes, in one
    all-reduce of one flat float32 buffer. A parameter without a gradient on some process counts as
    zero there; one without a gradient anywhere keeps none (the optimiser skips it, as it would alone)."""
    if not is_distributed():
        return
    parameters = _trainable(optimizer)
    if not parameters:
        return
    target = _state().device
    pieces = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().to(target)
        for p in parameters
    ]
    present = torch.tensor([float(p.grad is not None) for p in parameters], device=target)
    flat = torch.cat(pieces + [present])
    torch.distributed.all_reduce(flat)
    flat /= num_processes()
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        averaged = flat[offset : offset + size].view_as(parameter).to(parameter.device, parameter.dtype)
        offset += size
        if parameter.grad is not None:
            parameter.grad.copy_(averaged)
        else:
            parameter.grad = averaged.clone()
    for parameter, seen in zip(parameters, flat[offset:].tolist()):
        if seen == 0:
            parameter.grad = None


def broadcast_parameters(*modules: torch.nn.Module) -> None:
    """The main process's weights copied into every process's modules (what DDP does when it wraps a
    model): the copies start identical even if they were built with different random states."""
    if not is_distributed():
        return
    unique = list({id(p): p for module in modules for p in module.parameters()}.values())
    if not unique:
        return
    target = _state().device
    flat = torch.cat([t.detach().reshape(-1).float().to(target) for t in unique])
    torch.distributed.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for tensor in unique:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


# ----- checkpoints of several processes -------------------------------------------------------------
def process_rng_states(generators: Sequence[torch.Generator]) -> list | None:
    """Every process's states of ``generators`` (its own prompt draws and sampling), for the main
    process's checkpoint; None alone (the checkpoint's own random states are the process's)."""
    if not is_distributed():
        return None
    return gather_objects([[generator.get_state() for generator in generators]])


def restore_process_rng(saved: list | None, generators: Sequence[torch.Generator], seed: int) -> None:
    """Give each process back its own ``generators`` states from ``process_rng_states``. A checkpoint
    of another number of processes cannot: the processes other than the main one then draw from
    fresh seeds of their own (``process_seed``), and the run goes on, no longer the one it would have been."""
    if saved is not None and len(saved) == num_processes():
        for generator, state in zip(generators, saved[process_index()]):
            generator.set_state(state)
    elif is_distributed() and process_index() > 0:
        for offset, generator in enumerate(generators):
            generator.manual_seed(process_seed(seed + offset))
