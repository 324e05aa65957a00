"""The PPO arm of ``python -m rlhf_core bench --against trl``: our PPO iteration against TRL 0.24's.

TRL 1.x has no PPO trainer; its last one is in TRL 0.24, which needs ``transformers`` 4.x while the
course runs on the current one. So this comparison runs in an environment of its own, built once:

    python -m venv .venv-trl024
    .venv-trl024/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu  # or your CUDA build
    .venv-trl024/bin/pip install "trl==0.24.0" "transformers>=4.56,<5" -e .

``python -m rlhf_core bench --against trl`` then runs this module with that Python (or with the one
``$RLHF_TRL_PPO_PYTHON`` names) and reads its JSON; without it the bench says the PPO comparison
was skipped. By hand:

    .venv-trl024/bin/python -m rlhf_core.bench_trl_ppo --json ppo.json

Both arms run in that environment, interleaved, one thread each: our PPO iteration and TRL 0.24's
``PPOTrainer`` from the same weights (the profile's base model as policy and reference, the same
reward model as scorer and as the value model's start), on the same 64 world prompts per
iteration, 48 new tokens at most, stopping at EOS, 4 epochs of 4 minibatches of 16, the missing-EOS
penalty and KL coefficient alike, fp32, learning rates 0 so that both arms keep sampling from the
same policy (the same response lengths, on average). Each repeat builds both trainers afresh, with
a new sampling seed (so the repeats average over the responses' lengths), and times their
iterations after the first (a warm-up).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from .bench import BenchConfig, starting_policy
from .bench_measure import per_step, synchronize, ticking, timed_arms
from .config import get_profile
from .reward_model import reward_model_from_policy, score_batch
from .rlhf import PPOConfig, ValueModel, ppo_iteration
from .rlhf_trainer import PPOTrainer
from .tokenizer import load_tokenizer
from .world import sample_prompts

PROMPT_SEED = 7_100  # the PPO prompts of this comparison
ITERATIONS = 4  # per repeat and arm: the first is a warm-up, the mean of the other three is timed


def our_arm(policy, reward_model, tokenizer, prompts: list[str], config: PPOConfig, lengths: list[float]):
    """``ITERATIONS`` iterations of a fresh ``PPOTrainer`` on all the prompts (as TRL's batch holds
    them all), ticking after each."""

    runs = itertools.count()  # each run samples with a new seed, as TRL's arm does

    def run(tick) -> None:
        seeded = replace(config, seed=config.seed + next(runs))
        value_model = ValueModel.from_reward_model(reward_model)
        trainer = PPOTrainer(
            copy.deepcopy(policy),
            copy.deepcopy(policy),
            reward_model,
            value_model,
            tokenizer,
            prompts,
            seeded,
            score_batch,
        )
        for _ in range(ITERATIONS):
            record, _ = ppo_iteration(trainer.models, prompts, seeded, trainer.state)
            lengths.append(record["length"])
            tick()

    return run


def trl_arm(policy, reward_model, tokenizer, prompts: list[str], config: PPOConfig):
    """``ITERATIONS`` iterations of a fresh TRL 0.24 ``PPOTrainer`` at the same settings, ticking after each."""
    trl = importlib.import_module("trl")  # 0.24, in its own environment
    left_padded = copy.deepcopy(tokenizer)
    left_padded.padding_side = "left"  # TRL generates from the batch its collator pads
    dataset = Dataset.from_dict({"input_ids": left_padded(prompts, add_special_tokens=False)["input_ids"]})

    class Ticker(TrainerCallback):
        tick = None

        def on_step_end(self, args, state, control, **kwargs):
            self.tick()

    ticker = Ticker()

    runs = itertools.count()  # each run samples with a new seed: repeats average over the sampling

    def run(tick) -> None:
        ticker.tick = tick
        seed = config.seed + next(runs)
        rm = copy.deepcopy(reward_model)
        rm.config.pad_token_id = tokenizer.pad_token_id
        arguments = trl.PPOConfig(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=config.prompts_per_iteration,
            gradient_accumulation_steps=1,
            num_mini_batches=config.prompts_per_iteration // config.minibatch_size,
            num_ppo_epochs=config.ppo_epochs,
            total_episodes=ITERATIONS * config.prompts_per_iteration,
            response_length=config.max_new_tokens,
            temperature=config.temperature,
            stop_token="eos",
            missing_eos_penalty=config.missing_eos_penalty,
            kl_coef=config.kl_coef,
            cliprange=config.clip_range,
            cliprange_value=config.clip_range_value,
            gamma=config.gamma,
            lam=config.lam,
            vf_coef=config.value_loss_coef,
            learning_rate=0.0,
            local_rollout_forward_batch_size=config.prompts_per_iteration,
            num_sample_generations=0,
            max_grad_norm=config.max_grad_norm,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=seed,
        )
        trainer = trl.PPOTrainer(
            args=arguments,
            processing_class=left_padded,
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(policy),
            reward_model=rm,
            value_model=copy.deepcopy(reward_model),
            train_dataset=dataset,
            callbacks=[ticker],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_core.bench_trl_ppo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = BenchConfig()
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--prompts", type=int, default=defaults.ppo_prompts)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--epochs", type=int, default=defaults.ppo_epochs)
    parser.add_argument("--minibatch-size", type=int, default=defaults.ppo_minibatch_size)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(profile.tokenizer)
    policy, weights = starting_policy(profile, tokenizer, device, seed=0)
    reward_model = reward_model_from_policy(policy)
    config = PPOConfig.for_profile(
        profile,
        prompts_per_iteration=args.prompts,
        max_new_tokens=args.max_new_tokens,
        ppo_epochs=args.epochs,
        minibatch_size=args.minibatch_size,
        policy_learning_rate=0.0,
        value_learning_rate=0.0,
    )
    prompts = sample_prompts(args.prompts, PROMPT_SEED)  # every iteration of both arms draws from these
    lengths: list[float] = []  # our responses' mean length, per iteration
    arms = {
        "ours": our_arm(policy, reward_model, tokenizer, prompts, config, lengths),
        "trl": trl_arm(policy, reward_model, tokenizer, prompts, config),
    }
    for arm in arms.values():  # warm-up, untimed
        stamps, tick = ticking(device)
        arm(tick)
        per_step(stamps)
    synchronize(device)
    seconds = timed_arms(arms, args.repeats, device)
    ours, trl = statistics.median(seconds["ours"]), statistics.median(seconds["trl"])
    results = {
        "seconds": ours,
        "seconds_min": min(seconds["ours"]),
        "seconds_max": max(seconds["ours"]),
        "trl_seconds": trl,
        "trl_seconds_min": min(seconds["trl"]),
        "trl_seconds_max": max(seconds["trl"]),
        "trl_ratio": trl / ours,
        "trl_version": importlib.import_module("trl").__version__,
        "transformers": transformers.__version__,
        "weights": weights,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "mean_response_tokens": statistics.mean(lengths),
    }
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
