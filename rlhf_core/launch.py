"""Starting several CPU processes with ``accelerate launch --cpu --num_processes N``.

On GPUs ``accelerate launch --num_processes N`` starts N processes through ``torch.distributed.run``
(torchrun), one per GPU. With ``--cpu`` and no MPI set up, accelerate's launcher starts a *single*
process instead (accelerate issue #2741): it sets the rendezvous address and ``ACCELERATE_USE_CPU`` but
runs the command once, so every "process" would train alone. ``relaunch_cpu_processes``, called first
thing by the course's entry points (``python -m rlhf_core``, ``tests/distributed_script.py``), notices
that case, reads N and the command from the ``accelerate launch`` that started it, and starts the N
processes the way accelerate does for GPUs: ``torch.distributed.run``, ``OMP_NUM_THREADS`` (one thread
each unless said otherwise) passed on. Each of them then joins the process group through
``accelerate.PartialState`` (``rlhf_core.distributed``), as under a GPU launch; the one that started
them waits and returns their exit status. Everywhere else it does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from .distributed import launched_world_size, truthy


def accelerate_launch_arguments() -> list[str] | None:
    """The arguments of the ``accelerate launch`` that started this process (after ``launch``), None
    when its parent is no ``accelerate launch``."""
    try:
        import psutil  # accelerate's own dependency

        command = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no parent to read (gone, or not allowed): launched by something else
        return None
    for position, word in enumerate(command):
        if word == "launch" or word.endswith("accelerate.commands.launch"):
            return command[position + 1 :]
    return None


def relaunch_cpu_processes() -> int | None:
    """The exit status of the N processes this one started, when it is the lone process of ``accelerate
    launch --cpu --num_processes N`` (N > 1, one machine, no MPI hostfile; ``--cpu`` may be left out on a
    machine without CUDA); None, doing nothing, otherwise."""
    on_cpu = truthy(os.environ.get("ACCELERATE_USE_CPU")) or not torch.cuda.is_available()
    # accelerate's lone process: no rank of its own, but the address it set for N > 1 processes to meet at
    if not on_cpu or launched_world_size() > 1 or "LOCAL_RANK" in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    words = accelerate_launch_arguments()
    if words is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(words)
    except SystemExit:  # not arguments accelerate understands: leave this process alone
        return None
    processes = args.num_processes or 1
    if processes <= 1 or (args.num_machines or 1) > 1 or args.mpirun_hostfile:
        return None
    port = [f"--master_port={args.main_process_port}"] if args.main_process_port else ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *port, f"--nproc_per_node={processes}"]
    command += (["--module"] if args.module else []) + [args.training_script, *args.training_script_args]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    environment.setdefault("OMP_NUM_THREADS", str(args.num_cpu_threads_per_process or 1))
    return subprocess.call(command, env=environment)
