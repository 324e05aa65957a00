"""Command line: ``python -m rlhf_core {run,pretrain,world,chapters}``.

    python -m rlhf_core run [--profile tiny|small|gpt2|gpt2-medium|gpt2-large|auto] [--out DIR]
                            [--fresh [STAGE]] [--until STAGE] [--precision auto|fp32|bf16|fp16] [--quick]
                            [--lora] [--lora-rank N]                         the pipeline, stage by stage
    python -m rlhf_core pretrain [--profile tiny|small]                     (re)build the base model
    python -m rlhf_core world [--n 5] [--seed 0]                            print a few world reviews
    python -m rlhf_core chapters [NN ...]               re-execute the chapters in place (tiny profile)
    python -m rlhf_core bench [--against trl] [--quick] seconds per step, fraction of peak, against TRL

Bad input gets one line on stderr naming the flag and the fix, and exit status 2; it is checked before
any stage runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import bench, launch, notebooks
from .config import PROFILE_NAMES, REPO_DIR, get_profile, select_device
from .errors import CourseError
from .gold import gold_score
from .pipeline import STAGES, PipelineConfig, run_pipeline
from .precision import PRECISION_VARIABLE, PRECISIONS, resolve_precision
from .pretrain import build_offline_world, pretrain
from .report import check_output_folder
from .training import NonFiniteLossError
from .world import ReviewWorld

PROG = "python -m rlhf_core"
DEFAULT_LORA_RANK = 8  # --lora's rank when --lora-rank is left out


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where the help is), exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Checks: each turns bad input into a CourseError naming the flag and the fix


def _flag_and_value(flag: str, value: str | None, variable: str) -> tuple[str, str | None, str]:
    """(how to name it in a message, the value, how to take it back): the flag's, else the environment's."""
    if value:
        return f"{flag} {value}", value, f"leave {flag} out"
    value = os.environ.get(variable) or None  # set but empty counts as unset
    return f"{variable}={value}", value, f"unset {variable}"


def checked_profile(name: str | None) -> str:
    """The profile ``--profile`` (else ``$RLHF_PROFILE``, else auto) names, known to exist."""
    where, value, undo = _flag_and_value("--profile", name, "RLHF_PROFILE")
    if value is not None and value.strip().lower() not in PROFILE_NAMES:
        raise CourseError(f"{where}: no such profile; use one of {', '.join(PROFILE_NAMES)} (or {undo})")
    return (value or "auto").strip().lower()


def checked_device(name: str | None) -> torch.device:
    """The device ``--device`` (else ``$RLHF_DEVICE``, else the best available) names, known to be usable."""
    where, value, undo = _flag_and_value("--device", name, "RLHF_DEVICE")
    if not value:
        return select_device()
    try:
        device = torch.device(value)
    except RuntimeError:
        raise CourseError(f"{where}: not a device; use cpu, cuda, cuda:N or mps, or {undo}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CourseError(f"{where}: CUDA is not available on this machine; use --device cpu or {undo}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CourseError(
            f"{where}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0; "
            f"use --device cuda or {undo}"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CourseError(f"{where}: Apple's MPS is not available on this machine; use --device cpu or {undo}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CourseError(f"{where}: the course runs on cpu, cuda or mps; use one of them or {undo}")
    return device


def checked_precision(name: str | None, device: torch.device) -> str:
    """The precision ``--precision`` (else ``$RLHF_PRECISION``, else auto) names, resolved for ``device``
    (``rlhf_core.precision``): fp32, bf16 or fp16."""
    where, value, undo = _flag_and_value("--precision", name, PRECISION_VARIABLE)
    chosen = (value or "auto").strip().lower()
    if chosen not in PRECISIONS:
        raise CourseError(f"{where}: not a precision; use one of {', '.join(PRECISIONS)} (or {undo})")
    if chosen == "fp16" and device.type != "cuda":
        raise CourseError(
            f"{where}: float16 with loss scaling needs a CUDA device and this run is on {device}; "
            f"use --precision fp32 (or bf16), or {undo}"
        )
    return resolve_precision(chosen, device)


def checked_seed(seed: int) -> int:
    """``--seed``, in the range every random generator the course seeds accepts."""
    if not 0 <= seed < 2**63:
        raise CourseError(f"--seed {seed}: a seed is a whole number from 0 to 2**63 - 1; use --seed 0, for example")
    return seed


def checked_best_of_n(n: int | None) -> dict:
    """``--best-of-n`` as a PipelineConfig override (none when left out)."""
    if n is None:
        return {}
    if n < 1:
        raise CourseError(
            f"--best-of-n {n}: best-of-n needs at least 1 candidate per prompt; "
            f"use --best-of-n 8 (the CPU default) or leave it out"
        )
    return {"best_of_n": n}


def checked_lora(lora: bool, rank: int | None) -> dict:
    """``--lora`` / ``--lora-rank N`` as a profile override (none when both are left out): LoRA adapters
    of rank N (default 8) on every trained policy."""
    if rank is not None and rank < 1:
        raise CourseError(
            f"--lora-rank {rank}: a LoRA rank is a whole number of at least 1; use --lora-rank 8 (the default), "
            f"or leave --lora and --lora-rank out for full fine-tuning"
        )
    if not lora and rank is None:
        return {}
    return {"lora_rank": rank if rank is not None else DEFAULT_LORA_RANK}


# ----------------------------------------------------------------------------------------------
# The commands


def command_run(args) -> int:
    """The whole pipeline (``rlhf_core.pipeline``): stages, results table, metrics, report, figures."""
    # every argument is checked before the first stage runs
    profile = get_profile(checked_profile(args.profile), quick=args.quick or None)  # None: $RLHF_QUICK decides
    profile = profile.with_overrides(**checked_lora(args.lora, args.lora_rank))
    device = checked_device(args.device)
    precision = checked_precision(args.precision, device)
    out = check_output_folder(args.out)
    config = PipelineConfig.for_profile(profile, seed=checked_seed(args.seed), **checked_best_of_n(args.best_of_n))
    metrics = run_pipeline(
        profile, out, device=device, config=config, fresh=args.fresh, until=args.until, precision=precision
    )
    return 0 if all(metrics["checks"].values()) or not args.strict else 1


def command_pretrain(args) -> int:
    profile = get_profile(checked_profile(args.profile))
    if not profile.offline:
        raise CourseError(
            f"--profile {profile.name}: it starts from the hub checkpoint '{profile.base_model}', "
            f"there is nothing to pretrain; use --profile tiny or small"
        )
    device = checked_device(args.device)
    if profile.name == "tiny":
        _, _, summary = build_offline_world(profile, device=device, rebuild_tokenizer=args.rebuild_tokenizer)
    else:
        _, summary = pretrain(profile, profile.base_model, device=device)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "config")}, indent=1))
    return 0


def command_world(args) -> int:
    if args.n < 0:
        raise CourseError(f"--n {args.n}: the number of reviews cannot be negative; use --n 5, for example")
    world = ReviewWorld(args.seed)
    for _ in range(args.n):
        review = world.review()
        print(f"mood {review.mood:+.2f}  gold {gold_score(review.prompt, review.response):+.3f}")
        print(f"  prompt:   {review.prompt}\n  response: {review.response.strip()}\n")
    return 0


def command_chapters(args) -> int:
    """Every chapter (or the ones named) re-executed in order, in place, in the tiny profile."""
    notebooks.execute_chapters(notebooks.chapter_paths(args.numbers), timeout=args.timeout, profile="tiny")
    return 0


def answer_errors(command: Callable[[], int]) -> int:
    """Run ``command``; what the course knows how to explain becomes one line on stderr and an exit status."""
    try:
        return command()
    except CourseError as error:  # known bad input or state: the message names it and the fix
        print(error, file=sys.stderr)
        return error.exit_status
    except NonFiniteLossError as error:  # training diverged: the message names the step and the usual causes
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the trainers have said where they will resume
        return 130


def parser() -> OneLineParser:
    main_parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="{run,pretrain,world,chapters,bench}")

    run = commands.add_parser("run", help="run the pipeline, print its results table, write metrics, report, figures")
    run.add_argument(
        "--profile",
        default=None,
        help="tiny, small, gpt2, gpt2-medium, gpt2-large or auto (default: $RLHF_PROFILE or auto)",
    )
    run.add_argument(
        "--out",
        default=str(REPO_DIR / "runs" / "latest"),
        type=Path,
        help="folder for metrics.json, report.md and the figures (default: runs/latest)",
    )
    run.add_argument(
        "--fresh",
        nargs="?",
        const="all",
        default=None,
        metavar="STAGE",
        choices=("all",) + STAGES,
        help="rebuild instead of reusing the cache: every stage, or STAGE and the stages built on it",
    )
    run.add_argument(
        "--until", default=None, choices=STAGES, metavar="STAGE", help=f"stop after this stage ({', '.join(STAGES)})"
    )
    run.add_argument("--best-of-n", type=int, default=None, help="candidates per prompt for best-of-n (at least 1)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed of the measurements")
    run.add_argument("--strict", action="store_true", help="exit with status 1 when a claim is not met")
    run.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="forward passes in fp32, or mixed bf16 / fp16 (CUDA) (default: $RLHF_PRECISION, else auto: "
        "bf16 or fp16 on CUDA, fp32 elsewhere)",
    )
    run.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters (peft) instead of every weight, in SFT, PPO, DPO, GRPO and RLOO, and in "
        "the reward model on the hub profiles; pi_ref is the policy with its adapters off (gpt2-medium and "
        "gpt2-large: the default)",
    )
    run.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        metavar="N",
        help=f"the adapters' rank (default {DEFAULT_LORA_RANK}; implies --lora)",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: few prompts, pairs, steps and iterations in every stage (or RLHF_QUICK=1)",
    )
    run.set_defaults(handler=command_run)

    pretrain_command = commands.add_parser("pretrain", help="pretrain the offline base model (tiny or small)")
    pretrain_command.add_argument("--profile", default="tiny", help="tiny or small")
    pretrain_command.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps")
    pretrain_command.add_argument(
        "--rebuild-tokenizer",
        action="store_true",
        help="retrain the BPE tokenizer too (tiny only; invalidates shipped checkpoints)",
    )
    pretrain_command.set_defaults(handler=command_pretrain)

    world = commands.add_parser("world", help="print reviews from the offline world with their gold")
    world.add_argument("--n", type=int, default=5)
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(handler=command_world)

    chapters = commands.add_parser(
        "chapters", help="re-execute the chapters in place (tiny profile), strip widget state"
    )
    chapters.add_argument("numbers", nargs="*", metavar="NN", help="only these chapters, e.g. 03 05 (default: all)")
    chapters.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default: 1800)")
    chapters.set_defaults(handler=command_chapters)

    bench_command = commands.add_parser("bench", help="seconds per step of every stage, and the fraction of the peak")
    bench.add_arguments(bench_command)
    bench_command.set_defaults(
        handler=lambda args: bench.command(
            args, get_profile(checked_profile(args.profile)), checked_device(args.device)
        )
    )
    return main_parser


def main(argv: list[str] | None = None) -> int:
    """The exit status of the command ``argv`` (default: the process's arguments)."""
    if argv is None:  # ``accelerate launch --cpu --num_processes N``: start the N processes (rlhf_core.launch)
        status = launch.relaunch_cpu_processes()
        if status is not None:
            return status
    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed as one line
        return stop.code if isinstance(stop.code, int) else 0
    return answer_errors(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
