"""``python -m rlhf_core bench``: seconds per step of every stage, and how far that is from the hardware.

    python -m rlhf_core bench [--profile P] [--device D] [--against trl] [--quick] [--json PATH]
    python -m rlhf_core bench --profile gpt2 --device cuda --json bench-gpu.json     on one GPU (or Colab)

Each stage runs the course's own code (``train_sft``, ``train_reward_model``, ``train_dpo``,
``PPOTrainer``, ``CriticFreeTrainer``, ``generate``) on the same offline data: prompts and
demonstrations from the review world, pairs of two demonstrations per prompt, responses of at most
``max_response_tokens`` tokens as sampled ones are. The models start from the profile's base model (a
randomly initialised one of its shape when the base model has not been built yet: the time of a
step does not depend on the weights). What is reported, per stage:

- ``seconds``, ``seconds_min``, ``seconds_max``: the median, min and max over ``repeats`` of the
  seconds per unit: an optimizer step (SFT, reward model, DPO: the mean over ``steps`` steps after
  an untimed first one), an iteration (PPO and GRPO, split into generation, scoring and update
  phases, each repeat from the same weights and seeds: the same responses), or a ``generate``
  call (generation, also as tokens per second and milliseconds per decode step, beside
  ``transformers``' own ``generate`` on the same model and prompts). Every repeat runs
  the same batches in the same order, from the same starting weights.
- ``fraction_of_peak``: the stage's FLOPs per second over the device's peak. FLOPs are counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on an untimed run of the same work: matrix
  multiplies and attention (its CPU kernels added, ``bench_measure``), not elementwise work. The peak is measured
  in the same run: the best FLOP/s of an n x n x n matmul in the stages' dtype on the same device,
  with the same threads.

``--against trl`` adds ``trl_seconds`` and ``trl_ratio`` (TRL's seconds over ours: above 1 means
rlhf_core is faster), from TRL's trainers at equal settings, interleaved with ours, on the same
batches in the same order (``rlhf_core.bench_trl``; ``pip install -e ".[bench]"``). TRL 1.x has no
PPO trainer: the PPO comparison runs TRL 0.24 and our iteration, both in TRL 0.24's own environment
(``rlhf_core.bench_trl_ppo`` says how to build it), and is reported as skipped without it.

It prints a Markdown table, one row per stage (seconds and their range, fraction of peak, and TRL's
seconds and ratio with ``--against trl``), with the machine, profile, precision and measured peak
above it, and below it the PPO phases, generation's tokens per second and ms per decode step. On a
GPU the stages run in the precision ``rlhf_core.precision`` picks (bf16 where the card has it) and
the peak is an 8192^3 matmul in that dtype.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import bench_trl, grpo
from .bench_measure import (
    DTYPES,
    FLOPS_COUNTED_BY,
    Arm,
    Ticks,
    counted_flops_per_step,
    device_name,
    flop_counter,
    measure_peak_flops,
    spread,
    timed,
    timed_arms,
    transformers_ms_per_decode_step,
)
from .config import Profile, get_profile, with_overrides
from .demonstrations import write_demonstrations
from .dpo import DPOConfig, precompute_reference_logps, train_dpo
from .errors import CourseError
from .generation import generate
from .grpo_trainer import CriticFreeTrainer
from .models import load_causal_lm, new_model
from .precision import resolve_precision
from .reward_model import RewardModelConfig, reward_model_from_policy, score_batch, train_reward_model
from .rlhf import PPOConfig, ValueModel
from .rlhf_trainer import PPOTrainer
from .sft import SFTConfig, train_sft
from .tokenizer import load_tokenizer
from .world import sample_prompts

BENCH_SEED = 7_000  # prompts and demonstrations of the bench (apart from every seed the course trains on)


@dataclass
class BenchConfig:
    repeats: int = 5  # timed repeats of every stage: median, min and max over them
    steps: int = 5  # timed optimizer steps per repeat of SFT, reward model and DPO (after one untimed step)
    n_pairs: int = 512  # preference pairs (and demonstrations) the steps draw their batches from
    batch_size: int = 32  # pairs (SFT: demonstrations) per optimizer step
    max_response_tokens: int = 64  # longest response in the pairs and demonstrations (the profile's sampling limit)
    beta: float = 0.1  # DPO's beta
    ppo_prompts: int = 64  # responses per PPO and GRPO iteration (GRPO: 16 prompts x 4 samples)
    max_new_tokens: int = 48  # longest response sampled by PPO, GRPO and generation
    ppo_epochs: int = 4  # passes over each rollout
    ppo_minibatch_size: int = 16  # responses per gradient step of PPO and GRPO (4 minibatches of 16)
    generation_prompts: int = 64  # prompts sampled in parallel when timing generation
    peak_matmul_size: int | None = None  # n of the n x n x n matmul that measures the peak (None: 2048 on a
    # CPU, 8192 on a GPU)
    threads: int | None = 1  # torch CPU threads per arm, the same for every arm (None: torch's default)
    seed: int = 0  # batch order, sampling and the random starting weights

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, quick: bool = False, **overrides) -> BenchConfig:
        """The bench's settings: the issue's (32 pairs per step, 64 prompts x 48 tokens, 4 epochs of 4
        minibatches); ``quick``: a few small steps and one repeat, for CI."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        config = cls(max_response_tokens=profile.max_new_tokens, max_new_tokens=min(48, profile.max_new_tokens))
        if quick:
            config = replace(
                config,
                repeats=1,
                steps=2,
                n_pairs=64,
                batch_size=8,
                ppo_prompts=8,
                max_new_tokens=8,
                ppo_epochs=1,
                ppo_minibatch_size=8,
                generation_prompts=8,
                peak_matmul_size=512,
            )
        return with_overrides(config, overrides)


# ----- the data and the models ---------------------------------------------------------------------
def bench_data(tokenizer, config: BenchConfig) -> tuple[list[dict], list[dict], list[str]]:
    """(demonstrations, preference pairs, prompts): two demonstrations of each world prompt make a
    pair; responses longer than ``max_response_tokens`` are left out, as sampling cuts them."""
    prompts = sample_prompts(2 * config.n_pairs, BENCH_SEED)
    first, second = (write_demonstrations(prompts, seed=BENCH_SEED + i) for i in (1, 2))

    def fits(text: str) -> bool:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= config.max_response_tokens

    pairs = [
        {"prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"]}
        for a, b in zip(first, second)
        if fits(a["response"]) and fits(b["response"])
    ][: config.n_pairs]
    demonstrations = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
    return demonstrations, pairs, prompts


def starting_policy(profile: Profile, tokenizer, device: torch.device, seed: int) -> tuple[torch.nn.Module, str]:
    """The profile's base model when it exists (shipped, pretrained or on the hub), else a random
    model of its shape; and which of the two it is."""
    built = not profile.offline or (Path(profile.base_model) / "model.safetensors").exists()
    if built:
        return load_causal_lm(profile.base_model, device=device), f"base model {profile.base_model}"
    model = new_model(profile, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, seed=seed)
    return model.to(device).eval(), f"random weights of the {profile.name} shape (no base model built yet)"


# ----- the stages ----------------------------------------------------------------------------------
@dataclass
class BenchRun:
    """What every stage of one bench run shares."""

    profile: Profile
    device: torch.device
    config: BenchConfig
    tokenizer: object
    policy: torch.nn.Module  # the starting weights of every arm (never trained itself)
    demonstrations: list[dict]
    pairs: list[dict]
    prompts: list[str]
    against_trl: bool

    @property
    def training(self) -> dict:
        """What the SFT, reward-model and DPO configs of the bench set: one untimed step first, no
        evaluation, no checkpoints."""
        config = self.config
        return {
            "steps": config.steps + 1,
            "batch_size": config.batch_size,
            "eval_every": 0,
            "checkpoint_every": 0,
            "seed": config.seed,
        }

    def training_stage(self, ours: Arm, trl: Arm | None = None) -> dict:
        """Count our FLOPs once, then time our arm (and TRL's, interleaved)."""
        flops = counted_flops_per_step(ours)
        arms = {"ours": ours} if trl is None else {"ours": ours, "trl": trl}
        seconds = timed_arms(arms, self.config.repeats, self.device)
        entry = {**spread(seconds["ours"]), "flops": flops, "unit": "optimizer step"}
        if trl is not None:
            entry.update(
                trl_seconds=statistics.median(seconds["trl"]),
                trl_seconds_min=min(seconds["trl"]),
                trl_seconds_max=max(seconds["trl"]),
            )
            entry["trl_ratio"] = entry["trl_seconds"] / entry["seconds"]
        return entry

    def sft(self) -> dict:
        config = SFTConfig.for_profile(self.profile, heldout_records=0, **self.training)

        def ours(tick: Ticks) -> None:
            model = copy.deepcopy(self.policy)
            train_sft(model, self.tokenizer, self.demonstrations, config, progress=False, callback=lambda _: tick())

        return self.training_stage(ours)

    def reward_model(self) -> dict:
        start = reward_model_from_policy(self.policy)
        config = RewardModelConfig.for_profile(self.profile, **self.training)

        def ours(tick: Ticks) -> None:
            model = copy.deepcopy(start)
            train_reward_model(model, self.tokenizer, self.pairs, [], config, progress=False, callback=lambda _: tick())

        trl = (
            bench_trl.arm(bench_trl.reward_model_trainer(start, self.tokenizer, self.pairs, config))
            if self.against_trl
            else None
        )
        return self.training_stage(ours, trl)

    def dpo(self) -> dict:
        config = DPOConfig.for_profile(self.profile, beta=self.config.beta, max_response_tokens=None, **self.training)
        reference = copy.deepcopy(self.policy)
        logps = precompute_reference_logps(reference, self.tokenizer, self.pairs)  # precomputed in both arms
        quiet = {"progress": False, "reference_logps": logps}

        def ours(tick: Ticks) -> None:
            model = copy.deepcopy(self.policy)
            train_dpo(model, reference, self.tokenizer, self.pairs, [], config, callback=lambda _: tick(), **quiet)

        trl = (
            bench_trl.arm(bench_trl.dpo_trainer(self.policy, self.tokenizer, self.pairs, config))
            if self.against_trl
            else None
        )
        return self.training_stage(ours, trl)

    @property
    def sampling(self) -> dict:
        """What the PPO and GRPO configs of the bench set."""
        config = self.config
        return {
            "max_new_tokens": config.max_new_tokens,
            "ppo_epochs": config.ppo_epochs,
            "minibatch_size": config.ppo_minibatch_size,
            "seed": config.seed,
        }

    def iterations(self, trainer_for_repeat: Callable[[], object]) -> dict:
        """PPO or GRPO: the first iteration of a fresh trainer per repeat (a fresh copy of the policy,
        the same seeds: every repeat samples and trains on the same responses), its phases from the
        trainer's record."""
        trainer_for_repeat().step()  # warm-up
        counter = flop_counter()
        with counter:
            trainer_for_repeat().step()
        flops = float(counter.get_total_flops())
        records = []
        for _ in range(self.config.repeats):
            seconds, record = timed(self.device, trainer_for_repeat().step)  # (building the trainer is not timed)
            records.append({**record, "seconds": seconds})
        phases = {phase: spread([r[f"seconds_{phase}"] for r in records]) for phase in ("generate", "score", "train")}
        return {
            **spread([r["seconds"] for r in records]),
            "flops": flops,
            "unit": "iteration",
            "phases": phases,
            "responses": self.config.ppo_prompts,
            "mean_response_tokens": records[0]["length"],
        }

    def ppo(self) -> dict:
        config = PPOConfig.for_profile(self.profile, prompts_per_iteration=self.config.ppo_prompts, **self.sampling)
        reference, reward_model = copy.deepcopy(self.policy), reward_model_from_policy(self.policy)

        def trainer() -> PPOTrainer:
            policy, value_model = copy.deepcopy(self.policy), ValueModel.from_reward_model(reward_model)
            return PPOTrainer(
                policy, reference, reward_model, value_model, self.tokenizer, self.prompts, config, score_batch
            )

        entry = self.iterations(trainer)
        entry["trl"] = bench_trl.ppo_against_trl024(self.profile, self.config) if self.against_trl else None
        if entry["trl"] and "trl_seconds" in entry["trl"]:
            entry.update(trl_seconds=entry["trl"]["trl_seconds"], trl_ratio=entry["trl"]["trl_ratio"])
        return entry

    def grpo(self) -> dict:
        prompts = self.config.ppo_prompts // grpo.GROUP_SIZE  # 16 prompts x 4 samples: 64 responses like PPO
        config = grpo.CriticFreeConfig.for_profile(self.profile, "grpo", prompts_per_iteration=prompts, **self.sampling)
        reference, reward_model = copy.deepcopy(self.policy), reward_model_from_policy(self.policy)

        def trainer() -> CriticFreeTrainer:
            return CriticFreeTrainer(
                copy.deepcopy(self.policy), reference, reward_model, self.tokenizer, self.prompts, config, score_batch
            )

        return self.iterations(trainer)

    def generation(self) -> dict:
        prompts = self.prompts[: self.config.generation_prompts]

        def sample() -> object:
            generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
            return generate(self.policy, self.tokenizer, prompts, self.config.max_new_tokens, 1.0, generator)

        sample()  # warm-up
        counter = flop_counter()
        with counter:
            result = sample()  # the same seed every time: the same tokens, the same work
        seconds = [timed(self.device, sample)[0] for _ in range(self.config.repeats)]
        tokens = int(result.response_mask.sum())
        decode_steps = result.response_mask.shape[1] - result.prompt_width  # one sampled column per step
        median = statistics.median(seconds)
        return {
            **spread(seconds),
            "flops": float(counter.get_total_flops()),
            "unit": "generate call",
            "prompts": len(prompts),
            "tokens": tokens,
            "tokens_per_second": tokens / median,
            "ms_per_decode_step": 1000 * median / decode_steps,
            "transformers_ms_per_decode_step": transformers_ms_per_decode_step(
                self.policy, self.tokenizer, prompts, self.config.max_new_tokens, self.config.repeats, self.config.seed
            ),
        }


STAGES = ("sft", "reward_model", "dpo", "ppo", "grpo", "generation")


def run_bench(
    profile: Profile,
    device: torch.device,
    config: BenchConfig | None = None,
    against_trl: bool = False,
    progress: bool = True,
) -> dict:
    """Every stage measured (see the module docstring); returns the JSON-ready results."""
    config = config or BenchConfig.for_profile(profile)
    if against_trl:
        bench_trl.require_trl()  # before anything runs
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    precision = resolve_precision(None, device)
    tokenizer = load_tokenizer(profile.tokenizer)
    policy, weights = starting_policy(profile, tokenizer, device, config.seed)
    demonstrations, pairs, prompts = bench_data(tokenizer, config)
    size = config.peak_matmul_size or (2048 if device.type == "cpu" else 8192)
    peak = measure_peak_flops(device, DTYPES[precision], size)
    run = BenchRun(profile, device, config, tokenizer, policy, demonstrations, pairs, prompts, against_trl)
    stages = {}
    for name in STAGES:
        if progress:
            print(f"bench: {name} ...", flush=True)
        stages[name] = getattr(run, name)()
    peak = max(peak, measure_peak_flops(device, DTYPES[precision], size))  # measured again at the end: the best
    for entry in stages.values():
        entry["fraction_of_peak"] = entry["flops"] / entry["seconds"] / peak
    return {
        "device": device_name(device, config.threads),
        "profile": profile.name,
        "precision": precision,
        "weights": weights,
        "peak_flops": peak,
        "peak_matmul": f"{size} x {size} x {size}, {precision}",
        "flops_counted_by": FLOPS_COUNTED_BY,
        "torch": torch.__version__,
        "config": asdict(config),
        "trl": bench_trl.trl_version() if against_trl else None,
        "stages": stages,
    }


# ----- the command ---------------------------------------------------------------------------------
def table(results: dict) -> str:
    """The results as a Markdown table (the README shows one), the machine named above it."""
    trl = any("trl_seconds" in entry for entry in results["stages"].values())
    lines = [
        f"{results['device']}; profile {results['profile']}, {results['precision']}; "
        f"peak {results['peak_flops'] / 1e9:.1f} GFLOP/s ({results['peak_matmul']} matmul)",
        "",
        "| stage | seconds (min-max) | fraction of peak |" + (" TRL seconds | TRL / rlhf_core |" if trl else ""),
        "|---|---|---|" + ("---|---|" if trl else ""),
    ]
    for name, entry in results["stages"].items():
        row = (
            f"| {name}, s per {entry['unit']} | {entry['seconds']:.3f} ({entry['seconds_min']:.3f}-"
            f"{entry['seconds_max']:.3f}) | {entry['fraction_of_peak']:.3f} |"
        )
        if trl:
            row += f" {entry['trl_seconds']:.3f} | {entry['trl_ratio']:.2f} |" if "trl_seconds" in entry else " - | - |"
        lines.append(row)
    ppo = results["stages"]["ppo"]
    lines.append("")
    lines.append(
        "PPO iteration: " + ", ".join(f"{phase} {entry['seconds']:.3f} s" for phase, entry in ppo["phases"].items())
    )
    against = ppo.get("trl") or {}
    if "skipped" in against:
        lines.append(f"PPO against TRL 0.24: skipped ({against['skipped']})")
    elif against:
        lines.append(
            f"PPO against TRL {against['trl_version']}, both arms timed in its environment (transformers "
            f"{against['transformers']}): rlhf_core {against['seconds']:.3f} s, "
            f"TRL {against['trl_seconds']:.3f} s per iteration, ratio {against['trl_ratio']:.2f}"
        )
    generation = results["stages"]["generation"]
    lines.append(
        f"generation: {generation['tokens_per_second']:.0f} tokens/s, "
        f"{generation['ms_per_decode_step']:.1f} ms per decode step ({generation['prompts']} prompts); "
        f"transformers' generate on the same model and prompts: "
        f"{generation['transformers_ms_per_decode_step']:.1f} ms per decode step"
    )
    lines.append(f"FLOPs counted by {results['flops_counted_by']}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument("--profile", default=None, help="tiny, small, gpt2 or auto (default: $RLHF_PROFILE or auto)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    parser.add_argument(
        "--against",
        default=None,
        choices=("trl",),
        help="also time TRL's trainers at equal settings (pip install -e '.[bench]')",
    )
    parser.add_argument("--quick", action="store_true", help="a few small steps and one repeat (CI)")
    parser.add_argument("--json", default=None, type=Path, metavar="PATH", help="also write the results here")


def command(args, profile: Profile, device: torch.device) -> int:
    """``python -m rlhf_core bench``: measure, print the table, write the JSON (every flag checked first)."""
    if args.json is not None:
        folder = args.json.parent if str(args.json.parent) else Path(".")
        if args.json.is_dir() or (folder.exists() and not os.access(folder, os.W_OK)):
            raise CourseError(f"--json {args.json}: cannot write a file there; name a file in a writable folder")
    if args.against == "trl":
        bench_trl.require_trl()
    results = run_bench(
        profile, device, BenchConfig.for_profile(profile, quick=args.quick), against_trl=args.against == "trl"
    )
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0
