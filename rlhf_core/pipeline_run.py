"""What the stages of one ``python -m rlhf_core run`` share (``PipelineRun``: profile, device, held-out prompts,
the SFT model and the reward model, loaded once) and how a stage's measurement is cached: in ``stage_file``, under
a key made of the content hashes of the weights it measured and of the measurement settings (``PipelineRun.key``),
through ``cache.cached_json``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import distributed, report, stages
from .cache import cached_json, file_digest, stable_hash
from .config import Profile, cache_dir
from .evaluation import gold_summary, measure_policy
from .prompts import load_prompts
from .tokenizer import load_tokenizer

if TYPE_CHECKING:  # a type hint only: ``pipeline`` imports this module
    from .pipeline import PipelineConfig

FORMAT = 2  # version of the stage files; bump it when what a stage measures changes (2: gold's ending rule)


def stage_file(profile: Profile, stage: str) -> Path:
    """Where a stage's measurement is cached (a quick profile's, and a LoRA run's, apart: they never replace
    each other)."""
    kind = "pipeline-quick" if profile.quick else "pipeline"
    kind += f"-lora{profile.lora_rank}" if profile.lora_rank else ""
    return cache_dir() / profile.name / kind / f"{stage}.json"


# ----------------------------------------------------------------------------------------------
# The run


class PipelineRun:
    """The state shared by the stages of one run: profile, device, held-out prompts, loaded models."""

    def __init__(
        self, profile: Profile, device, config: PipelineConfig, progress: bool = True, rebuild: Sequence[str] = ()
    ):
        self.profile = profile
        self.device = device
        self.config = config
        self.progress = progress
        self.rebuild = set(rebuild)  # stages whose models are rebuilt rather than reused (``fresh``)
        self.eval_prompts = load_prompts(profile, "eval", profile.n_eval_prompts)
        self.results: dict[str, dict] = {}  # stage -> {"key", "metrics", "curves", "responses", ...}
        self.reused: dict[str, bool] = {}  # stage -> its stored measurement was reused
        self.started = time.time()  # a stage file written after this was built by this run: not "cached"
        self._models: dict[str, tuple] = {}

    # ----- models, loaded once per run (trained by ``rlhf_core.stages`` when missing) -----
    def sft(self):
        """(policy, reference, tokenizer): the SFT model and its frozen copy pi_ref."""
        if "sft" not in self._models:
            self._models["sft"] = stages.load_or_train_sft(
                self.profile, device=self.device, progress=self.progress, rebuild="sft" in self.rebuild
            )
        return self._models["sft"]

    def reward_model(self):
        """(reward_model, tokenizer, metrics) of the profile."""
        if "reward_model" not in self._models:
            self._models["reward_model"] = stages.load_or_train_reward_model(
                self.profile, device=self.device, progress=self.progress, rebuild="reward_model" in self.rebuild
            )
        return self._models["reward_model"]

    # ----- cache keys -----
    def key(self, stage: str, files: Sequence[Path], upstream: Sequence[str] = (), extra=None) -> str:
        """What a stage's measurement depends on: the files it measured, the keys of the stages
        whose results it reads, the measurement settings and the held-out prompts."""
        identity = {
            "format": FORMAT,
            "stage": stage,
            "profile": self.profile.name,
            "seed": self.config.seed,
            "examples": self.config.examples,
            "max_new_tokens": self.profile.max_new_tokens,
            "prompts": stable_hash(self.eval_prompts, 64),
            "files": [file_digest(path) for path in files],
            "upstream": [self.results[name]["key"] for name in upstream],
            "extra": extra,
        }
        return stable_hash(identity, 16)

    # ----- measuring -----
    def repeated_prompts(self, samples_per_prompt: int) -> list[str]:
        """The held-out prompts, ``samples_per_prompt`` times over: row j * P + i is the j-th sample of
        prompt i (the layout of ``best_of_n.sample_candidates``: the first P rows are one sample each)."""
        return list(self.eval_prompts) * samples_per_prompt

    def measure(
        self, policy, with_reference: bool = True, with_reward: bool = True, samples_per_prompt: int = 1
    ) -> tuple[dict, dict]:
        """``measure_policy`` on the held-out prompts: (metrics, responses) of one stage."""
        _, reference, tokenizer = self.sft() if with_reference else (None, None, None)
        tokenizer = tokenizer or load_tokenizer(self.profile.tokenizer)
        reward_model = self.reward_model()[0] if with_reward else None
        # several processes: the main one samples (one seeded stream: the numbers of one process), all get them
        result = distributed.on_main(
            lambda: measure_policy(
                policy,
                reference,
                reward_model,
                tokenizer,
                self.repeated_prompts(samples_per_prompt),
                self.profile.max_new_tokens,
                seed=self.config.seed,
                batch_size=self.profile.generation_batch_size,
                progress=self.progress,
            )
        )
        metrics = {
            **gold_summary(result.golds, result.responses, result.ended, len(self.eval_prompts)),
            "reward": round(result.reward, 4) if with_reward else None,
            "kl": round(result.kl, 4) if with_reference else None,
            "samples_per_prompt": samples_per_prompt,
        }
        return metrics, {
            "responses": result.responses,
            "ended": result.ended,
            "golds": [round(float(g), 4) for g in result.golds],
        }

    def files_of(self, *names: str) -> list[Path]:
        """The files the stages ``names`` measured (their results' ``files``)."""
        return [Path(path) for name in names for path in self.results[name]["files"]]

    def examples(self, responses: dict) -> list[dict]:
        """The first ``config.examples`` held-out prompts with this stage's response and its gold."""
        count = min(self.config.examples, len(responses["responses"]))
        return [
            {"prompt": self.eval_prompts[i], "response": responses["responses"][i], "gold": responses["golds"][i]}
            for i in range(count)
        ]


def cached_or_measure(
    run: PipelineRun,
    stage: str,
    files: Sequence[Path],
    upstream: Sequence[str],
    measure: Callable[[], dict],
    extra=None,
) -> None:
    """Reuse the stage's stored measurement when its key matches, else ``measure()`` and store it.
    Sets ``run.results[stage]`` and ``run.reused[stage]`` (True when the stored measurement was reused)."""
    key = run.key(stage, files, upstream, extra)
    # plain JSON data (numpy numbers as Python's, NaN as None): a fresh result reads as a cached one will
    result, run.reused[stage] = cached_json(stage_file(run.profile, stage), key, lambda: report.plain_json(measure()))
    run.results[stage] = {"key": key, **result}


def series(history: Sequence[dict], keys: Sequence[str], where: str) -> dict[str, list]:
    """Training curves: ``keys`` of the history rows that hold ``where`` (e.g. the evaluation rows)."""
    rows = [row for row in history if row.get(where) is not None]
    return {key: [row.get(key) for row in rows] for key in keys}
