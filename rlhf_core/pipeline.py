"""The whole course in one command: ``python -m rlhf_core run``. The stages, in the order the chapters teach them:

    base            the pretrained model the course starts from (shipped in ``data/`` for tiny)
    demonstrations  what the simulated writers produce: the imitation ceiling
    sft             supervised fine-tuning on the demonstrations; its frozen copy is pi_ref
    preferences     pairs of SFT samples, compared by simulated labelers
    reward_model    r_phi(x, y) trained on those pairs (Bradley-Terry)
    ppo             the four-model RLHF loop: maximise r_phi with a KL penalty to pi_ref
    dpo             the same preference pairs, without a reward model or sampling
    best_of_n       no training: sample n responses from SFT, keep the one r_phi likes best
    grpo            PPO's loop without the value model: each response's baseline is its prompt's group (chapter 08)
    rloo            the same, with the leave-one-out baseline (the mean of the prompt's other responses)

Every stage (``rlhf_core.pipeline_stages``) builds its model through ``rlhf_core.stages``, which caches it in
``cache_dir()/<profile>/``. Then the pipeline *measures* it, the same way for every stage: the same held-out prompts
(the profile's ``n_eval_prompts``), the same sampling seed, scored by the hidden human (gold), by the reward model and
by the KL to pi_ref (the SFT model) with ``evaluation.measure_policy``; so the gold means of the rows compare.

The measurements are cached in ``cache_dir()/<profile>/pipeline/<stage>.json`` under a key made of the content hashes of
the weights they measured and of the measurement settings: a rerun skips every stage whose models have not changed and
finishes in seconds. ``fresh`` rebuilds stages (models and measurements) of the selected profile only: never ``data/``,
other configurations' checkpoints (a chapter's PPO run with another beta) or preference labels a person made.
``run_pipeline`` returns the metrics and writes them, the report and the figures (``rlhf_core.report``).
``precision`` (``rlhf_core.precision``) holds for every stage of the run; ``metrics.json`` records the word it resolved
to. Only a precision other than the device's auto reaches the stages' cache keys (``rlhf_core.cache``): a run on auto
(or on what auto resolves to) reuses what the notebooks built, and they what it built. A quick profile
(``config.quick_variant``) keeps its measurements apart. Under ``accelerate launch`` every process runs every stage
(the trainers data-parallel, ``rlhf_core.distributed``); the main process alone prints and writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets.utils.logging import disable_progress_bar as no_dataset_bars
from transformers.utils.logging import disable_progress_bar as no_loading_bars

from . import distributed, report
from .config import Profile, cache_dir, get_profile, seed_everything, select_device, with_overrides
from .pipeline_run import PipelineRun, stage_file
from .pipeline_stages import STAGE_FUNCTIONS
from .precision import precision_setting, resolve_precision

STAGES = ("base", "demonstrations", "sft", "preferences", "reward_model", "ppo", "dpo", "best_of_n", "grpo", "rloo")
# What each stage is built from: rebuilding a stage rebuilds (with ``fresh``) what depends on it.
DEPENDS_ON = {
    "base": (),
    "demonstrations": (),
    "sft": ("base", "demonstrations"),
    "preferences": ("sft",),
    "reward_model": ("preferences", "sft"),
    "ppo": ("sft", "reward_model"),
    "dpo": ("sft", "preferences"),
    "best_of_n": ("sft", "reward_model"),
    "grpo": ("sft", "reward_model"),
    "rloo": ("sft", "reward_model"),
}


@dataclass(frozen=True)
class PipelineConfig:
    seed: int = 0  # sampling seed of every measurement (same prompts, same seed: rows compare)
    best_of_n: int = 8  # candidates per prompt for best-of-n (KL log n - (n-1)/n: 1.20 nats at 8);
    #                     SFT and the demonstrators are measured on as many samples per prompt (the candidates)
    measured_kl_prompts: int = 0  # held-out prompts on which best-of-n's KL is also measured (0: analytic only)
    measured_kl_samples: int = 128  # SFT samples per such prompt for the measured KL (should be >> best_of_n)
    examples: int = 3  # held-out prompts whose responses report.md shows for every stage

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> PipelineConfig:
        """The tiny and small profiles run on a CPU in minutes; on a GPU, best-of-16 with a measured KL."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        gpu = {"best_of_n": 16, "measured_kl_prompts": 32, "measured_kl_samples": 256} if not profile.offline else {}
        quick = {"best_of_n": 4, "measured_kl_prompts": 4 if gpu else 0, "measured_kl_samples": 16}  # a smoke test
        return with_overrides(cls(**(quick if profile.quick else gpu)), overrides)


# ----------------------------------------------------------------------------------------------
# The stage graph and --fresh (where each stage's measurement is stored: ``pipeline_stages.stage_file``)


def stages_from(stage: str | None) -> list[str]:
    """``stage`` and every stage built on it, in pipeline order; all stages for None or "all"."""
    if stage in (None, "all"):
        return list(STAGES)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    chosen = {stage}
    for name in STAGES:  # DEPENDS_ON only points backwards, so one pass in order suffices
        if any(dependency in chosen for dependency in DEPENDS_ON[name]):
            chosen.add(name)
    return [name for name in STAGES if name in chosen]


def clear_measurements(profile: Profile, names: Sequence[str]) -> list[Path]:
    """Delete the stored measurements of the stages ``names``; returns what was deleted (their models
    are rebuilt by ``rlhf_core.stages`` with ``rebuild=True``). Refuses paths outside ``cache_dir()/<profile>``."""
    root = (cache_dir() / profile.name).resolve()
    deleted = []
    for stage in names:
        path = stage_file(profile, stage)
        if root not in path.resolve().parents:
            raise RuntimeError(f"refusing to delete {path}: it is not inside {root}")
        if path.exists() or path.is_symlink():
            path.unlink()
            deleted.append(path)
    return deleted


# ----------------------------------------------------------------------------------------------
# The run (each stage's function: ``pipeline_stages.STAGE_FUNCTIONS``)


def run_pipeline(
    profile: Profile,
    out: str | Path,
    device=None,
    config: PipelineConfig | None = None,
    fresh: str | None = None,
    until: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    precision: str | None = None,
) -> dict:
    """Run the stages in order (up to ``until``), print a line per stage, write the outputs to
    ``out`` (``metrics.json``, ``curves.json``, ``report.md``, figures) and return the metrics.

    ``fresh``: None (reuse every cache), "all" (rebuild every stage) or a stage name (rebuild it and
    every stage built on it). Models are built on ``device`` (default: ``select_device()``) in ``precision``."""
    out = report.check_output_folder(out)
    config = config or PipelineConfig.for_profile(profile)
    device = device if device is not None else select_device()
    resolved = resolve_precision(precision, device)  # checked before any stage runs
    # several processes (``rlhf_core.distributed``): each runs every stage, the main one alone prints and writes
    echo = echo if echo is not None and distributed.is_main_process() else (lambda line: None)
    progress = distributed.shows(progress)
    stop = STAGES.index(until) + 1 if until else len(STAGES)
    no_dataset_bars()  # loading a tiny checkpoint or a JSON file is instant: no bars for it among the stages'
    no_loading_bars()
    rebuild = stages_from(fresh) if fresh is not None else []
    if rebuild:
        deleted = distributed.on_main(lambda: clear_measurements(profile, rebuild))
        echo(
            f"--fresh: rebuilding {', '.join(rebuild)} (profile {profile.name}; "
            f"{len(deleted)} stored measurement(s) deleted)"
        )
    seed_everything(config.seed)
    run = PipelineRun(profile, device, config, progress, rebuild)
    seconds, cached = {}, {}
    total_started = time.perf_counter()
    # Every stage's trainers and measurements read it. Set only when it differs from what they resolve to without it:
    # a model's cache identity holds the precision when one is set (``rlhf_core.cache``), and the same arithmetic
    # must find the same models (a CPU run's "fp32" is the notebooks' auto: setting it would key every stage apart).
    with precision_setting(None if resolved == resolve_precision(None, device) else resolved):
        for number, stage in enumerate(STAGES[:stop], start=1):
            echo(f"[{number}/{stop}] {report.STAGE_TITLES[stage]}")
            started = time.perf_counter()
            files = STAGE_FUNCTIONS[stage](run)
            run.results[stage]["files"] = [str(path) for path in files]
            seconds[stage] = round(time.perf_counter() - started, 2)
            cached[stage] = run.reused[stage] and not any(path.stat().st_mtime >= run.started for path in files)
            echo(
                f"      {'cached' if cached[stage] else 'done'} in {seconds[stage]:.1f} s: "
                f"{report.stage_line(stage, run.results[stage]['metrics'])}"
            )
    seconds["total"] = round(time.perf_counter() - total_started, 2)

    settings = {
        "profile": profile.name,
        "quick": profile.quick,
        "lora_rank": profile.lora_rank,
        "device": str(device),
        "processes": distributed.num_processes(),  # under accelerate launch: the data-parallel processes
        "precision": resolved,
        "config": asdict(config),
        "eval_prompts": len(run.eval_prompts),
        "max_new_tokens": profile.max_new_tokens,
    }
    metrics = report.collect_metrics(settings, run.results, seconds, cached)
    if distributed.is_main_process():
        report.write_outputs(metrics, run.results, out)
    distributed.wait_for_everyone()
    echo("")
    echo(report.results_table(metrics))
    echo(
        f"\nmetrics, report and figures written to {out} ({seconds['total']:.0f} s"
        f"{', every stage cached' if all(cached.values()) else ''})"
    )
    return metrics
