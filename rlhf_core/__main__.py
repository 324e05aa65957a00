"""Command line: ``python -m rlhf_core {run,pretrain,world}``.

    python -m rlhf_core run [--profile tiny|small|gpt2|auto] [--out DIR]   the pipeline, stage by stage
    python -m rlhf_core pretrain [--profile tiny|small]                     (re)build the base model
    python -m rlhf_core world [--n 5] [--seed 0]                            print a few world reviews
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import REPO_DIR, get_profile, select_device, seed_everything


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


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


def ensure_base_model(profile, device):
    """The profile's base model and tokenizer; an offline base that is missing is pretrained."""
    from .models import load_causal_lm
    from .pretrain import pretrain
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(profile.tokenizer)
    if profile.offline and not (Path(profile.base_model) / "model.safetensors").exists():
        print(f"no base model at {profile.base_model}: pretraining it now (one time)")
        pretrain(profile, profile.base_model, tokenizer=tokenizer, device=device)
    return load_causal_lm(profile.base_model, device=device), tokenizer


def command_run(args) -> int:
    """The pipeline's stages so far: the world, the base model, the gold on base samples."""
    from .evaluation import evaluate_policy
    from .models import count_parameters
    from .prompts import load_prompts

    profile = get_profile(args.profile)
    device = select_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"profile": profile.name, "device": str(device), "seconds": {}}
    rows = [("stage", "measure", "value")]

    started = time.perf_counter()
    train_prompts = load_prompts(profile, "train")
    eval_prompts = load_prompts(profile, "eval", profile.n_eval_prompts)
    metrics["world"] = {"train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts)}
    metrics["seconds"]["world"] = round(time.perf_counter() - started, 2)
    rows += [("world", "train prompts", str(len(train_prompts))),
             ("world", "held-out prompts", str(len(eval_prompts))),
             ("world", "example prompt", eval_prompts[0])]

    started = time.perf_counter()
    model, tokenizer = ensure_base_model(profile, device)
    metrics["base"] = {"parameters": count_parameters(model), "vocab_size": len(tokenizer)}
    summary_file = Path(profile.base_model) / "pretrain_summary.json"
    if summary_file.exists():
        metrics["base"]["validation_loss"] = json.loads(summary_file.read_text())["final_validation_loss"]
    metrics["seconds"]["base"] = round(time.perf_counter() - started, 2)
    rows += [("base", "parameters", f"{metrics['base']['parameters']:,}"),
             ("base", "vocabulary", str(len(tokenizer)))]
    if "validation_loss" in metrics["base"]:
        rows.append(("base", "validation loss", f"{metrics['base']['validation_loss']:.3f}"))

    started = time.perf_counter()
    evaluation = evaluate_policy(model, tokenizer, eval_prompts, profile.max_new_tokens, seed=args.seed,
                                 batch_size=profile.generation_batch_size, progress=True)
    metrics["base"].update(evaluation.summary())
    metrics["seconds"]["gold"] = round(time.perf_counter() - started, 2)
    rows += [("gold", "base gold mean", f"{evaluation.gold:+.3f}"),
             ("gold", "base ends with EOS", f"{evaluation.eos_fraction:.1%}"),
             ("gold", "base response words", f"{evaluation.mean_words:.1f}"),
             ("gold", "example response", evaluation.responses[0].strip()[:70])]

    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(_table(rows))
    print(f"\nmetrics written to {out / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline and print its results table")
    run.add_argument("--profile", default=None, help="tiny, small, gpt2 or auto (default: $RLHF_PROFILE or auto)")
    run.add_argument("--out", default=str(REPO_DIR / "runs" / "latest"), help="folder for metrics.json")
    run.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    run.add_argument("--seed", type=int, default=0)
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
