"""Command line: ``python -m rlhf_core {run,pretrain,world}``.

    python -m rlhf_core run [--profile tiny|small|gpt2|auto] [--out DIR] [--fresh [STAGE]] [--until STAGE]
                                                                            the pipeline, stage by stage
    python -m rlhf_core pretrain [--profile tiny|small]                     (re)build the base model
    python -m rlhf_core world [--n 5] [--seed 0]                            print a few world reviews
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import REPO_DIR, get_profile, select_device
from .pipeline import STAGES


def command_world(args) -> int:
    from .gold import gold_score
    from .world import ReviewWorld

    world = ReviewWorld(args.seed)
    for _ in range(args.n):
        review = world.review()
        print(f"mood {review.mood:+.2f}  gold {gold_score(review.prompt, review.response):+.3f}")
        print(f"  prompt:   {review.prompt}\n  response: {review.response.strip()}\n")
    return 0


def command_pretrain(args) -> int:
    from .pretrain import build_offline_world, pretrain

    profile = get_profile(args.profile)
    if not profile.offline:
        print(f"profile {profile.name} starts from the hub checkpoint '{profile.base_model}': nothing to pretrain")
        return 2
    device = select_device(args.device)
    if profile.name == "tiny":
        _, _, summary = build_offline_world(profile, device=device, rebuild_tokenizer=args.rebuild_tokenizer)
    else:
        _, summary = pretrain(profile, profile.base_model, device=device)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "config")}, indent=1))
    return 0


def command_run(args) -> int:
    """The whole pipeline (``rlhf_core.pipeline``): stages, results table, metrics, report, figures."""
    from .pipeline import PipelineConfig, run_pipeline

    profile = get_profile(args.profile)
    config = PipelineConfig.for_profile(profile, seed=args.seed,
                                        **({"best_of_n": args.best_of_n} if args.best_of_n else {}))
    metrics = run_pipeline(profile, args.out, device=select_device(args.device), config=config,
                           fresh=args.fresh, until=args.until)
    return 0 if all(metrics["checks"].values()) or not args.strict else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline, print its results table, write metrics, report, figures")
    run.add_argument("--profile", default=None, help="tiny, small, gpt2 or auto (default: $RLHF_PROFILE or auto)")
    run.add_argument("--out", default=str(REPO_DIR / "runs" / "latest"),
                     help="folder for metrics.json, report.md and the figures (default: runs/latest)")
    run.add_argument("--fresh", nargs="?", const="all", default=None, metavar="STAGE",
                     choices=("all",) + STAGES,
                     help="rebuild instead of reusing the cache: every stage, or STAGE and the stages built on it")
    run.add_argument("--until", default=None, choices=STAGES, metavar="STAGE",
                     help=f"stop after this stage ({', '.join(STAGES)})")
    run.add_argument("--best-of-n", type=int, default=None, help="candidates per prompt for best-of-n")
    run.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed of the measurements")
    run.add_argument("--strict", action="store_true", help="exit with status 1 when a claim is not met")
    run.set_defaults(handler=command_run)

    pretrain = commands.add_parser("pretrain", help="pretrain the offline base model (tiny or small)")
    pretrain.add_argument("--profile", default="tiny")
    pretrain.add_argument("--device", default=None)
    pretrain.add_argument("--rebuild-tokenizer", action="store_true",
                          help="retrain the BPE tokenizer too (tiny only; invalidates shipped checkpoints)")
    pretrain.set_defaults(handler=command_pretrain)

    world = commands.add_parser("world", help="print reviews from the offline world with their gold")
    world.add_argument("--n", type=int, default=5)
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(handler=command_world)

    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
