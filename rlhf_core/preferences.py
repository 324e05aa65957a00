"""Preference data: pairs of responses to one prompt, and which of the two a person preferred.

The reward model of chapter 03 learns from comparisons, the data of Christiano et al. (2017),
Stiennon et al. (2020) and Ouyang et al. (2022): for a prompt x, two responses y_a, y_b sampled
from the SFT policy, and a label saying which one a person chose. One record, one JSON line:

    {"prompt": x, "chosen": y_w, "rejected": y_l,              required, non-empty strings, y_w != y_l
     "chosen_gold": 0.71, "rejected_gold": -0.20,              optional: the hidden human's scores
     "chosen_ended": true, "rejected_ended": true,             optional: the response produced EOS
     "source": "simulated"}                                    optional: "simulated" or "human"

Here the "person" is ``rlhf_core.gold.PreferenceLabeler``: it reads the gold score of both
responses and chooses through a noisy Bradley-Terry model, P(a chosen) = sigmoid((gold_a - gold_b) / T).
The gold scores are stored for *analysis only* (how often did the labeler or the reward model
agree with the truth?); nothing that trains reads them. Human labels from chapter 01's widget have
no gold, and are stored with ``"source": "human"``.

``*_ended`` says whether the sampled response stopped with EOS before the length limit. The gold
punishes a response that never ended, so the reward model must be able to see it: such a response
is scored without an EOS token (see ``rlhf_core.reward_model.score_texts``). Missing means True.

Files are JSON Lines. ``load_preferences`` reads them line by line with ``json`` rather than with
``datasets.load_dataset("json")``: a hand-edited or widget-written file must fail with the file
name and the line number of the bad record, and ``datasets`` reports parse errors by byte offset
and silently fills missing fields with None. Blank lines are skipped (a trailing newline, or a
gap left by hand editing, is not an error); line numbers count every physical line, blank ones
included, so they match what an editor shows. ``preferences_dataset`` turns validated records into
a ``datasets.Dataset`` where one is handy (tables in the notebook).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Profile, get_profile, with_overrides
from .errors import CourseError
from .generation import sample_responses
from .gold import PreferenceLabeler, gold_scores, sigmoid

TEXT_FIELDS = ("prompt", "chosen", "rejected")  # required, non-empty strings
NUMBER_FIELDS = ("chosen_gold", "rejected_gold")  # optional, finite numbers (analysis only)
FLAG_FIELDS = ("chosen_ended", "rejected_ended")  # optional booleans, missing means True
SOURCES = ("simulated", "human")  # allowed values of the optional "source" field


class PreferenceFileError(CourseError, ValueError):  # a CourseError: the command line prints its one line
    """A preference file holds a record that cannot be used; the message names file and line."""


@dataclass
class PreferenceConfig:
    n_prompts: int = 3000  # prompts to compare responses on (the first n of the train prompts)
    responses_per_prompt: int = 2  # responses sampled per prompt; every pair of them is labelled
    sampling_temperature: float = 1.0  # the SFT policy's own distribution: what PPO will start from
    max_new_tokens: int = 64  # longest response; longer ones are cut and count as "no EOS"
    labeler_temperature: float = 0.25  # Bradley-Terry noise of the simulated labeler (gold units)
    generation_batch_size: int = 128  # prompts sampled in parallel
    seed: int = 0  # sampling seed; the labeler uses seed + 1 (its own stream)

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> PreferenceConfig:
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        config = cls(max_new_tokens=profile.max_new_tokens, generation_batch_size=profile.generation_batch_size)
        if not profile.offline:  # the hub GPT-2s
            config.n_prompts = 4000  # a GPU samples 124M-parameter responses quickly
        return with_overrides(config, overrides)


# ----------------------------------------------------------------------------------------------
# Reading and writing


def _location(path: Path, line_number: int) -> str:
    return f"{path}, line {line_number}"


def validate_record(record, where: str = "record") -> dict:
    """Return ``record`` if it is a usable preference, else raise ``PreferenceFileError``
    naming ``where`` (e.g. "prefs.jsonl, line 7") and what is wrong."""
    if not isinstance(record, dict):
        raise PreferenceFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in TEXT_FIELDS:
        if name not in record:
            raise PreferenceFileError(f"{where}: missing field {name!r} (need {', '.join(TEXT_FIELDS)})")
        value = record[name]
        if not isinstance(value, str):
            raise PreferenceFileError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise PreferenceFileError(f"{where}: field {name!r} is empty")
    if record["chosen"] == record["rejected"]:
        raise PreferenceFileError(f"{where}: 'chosen' and 'rejected' are the same text (no preference)")
    for name in NUMBER_FIELDS:
        if name in record:
            value = record[name]
            # bool is an int in Python; a gold score of `true` is a mistake, not 1.0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PreferenceFileError(f"{where}: field {name!r} must be a finite number, got {value!r}")
    for name in FLAG_FIELDS:
        if name in record and not isinstance(record[name], bool):
            raise PreferenceFileError(f"{where}: field {name!r} must be true or false, got {record[name]!r}")
    if "source" in record and record["source"] not in SOURCES:
        raise PreferenceFileError(f"{where}: field 'source' must be one of {SOURCES}, got {record['source']!r}")
    return record


def load_preferences(path: str | Path) -> list[dict]:
    """Every record of a JSONL preference file, validated (see the module docstring).

    Raises ``FileNotFoundError`` when the file is missing and ``PreferenceFileError`` (a
    ``ValueError``) naming the file and the 1-based line for a line that is not JSON, not an
    object, lacks a field, has a field of the wrong type, an empty text, or chosen == rejected.
    Blank lines are skipped; an empty file gives an empty list.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = _location(path, line_number)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PreferenceFileError(f"{where}: not valid JSON ({error.msg})") from None
            records.append(validate_record(record, where))
    return records


def save_preferences(path: str | Path, records: Sequence[dict]) -> Path:
    """Validate ``records`` and write them as JSON Lines (atomically: a crash leaves the old file)."""
    path = Path(path)
    for index, record in enumerate(records):
        validate_record(record, f"record {index} (to be written to {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return path


def preferences_dataset(records: Sequence[dict]):
    """Validated records as a ``datasets.Dataset`` (handy for ``.to_pandas()`` tables)."""
    from datasets import Dataset

    return Dataset.from_list([dict(record) for record in records])


# ----------------------------------------------------------------------------------------------
# Building simulated preferences


@dataclass
class Candidates:
    """Several sampled responses per prompt, with what the hidden human thinks of each."""

    prompts: list[str]  # one entry per prompt
    responses: list[list[str]]  # responses[i][j]: the j-th response sampled for prompts[i]
    ended: list[list[bool]]  # ended[i][j]: that response produced EOS before the length limit
    golds: list[list[float]]  # golds[i][j]: its gold score (labels and analysis only)


def sample_candidates(
    policy, tokenizer, prompts: Sequence[str], config: PreferenceConfig, seed: int = 0, progress: bool = False
) -> Candidates:
    """``config.responses_per_prompt`` responses per prompt from ``policy``, with their gold scores."""
    k, n = config.responses_per_prompt, len(prompts)
    # Row j * n + i holds the j-th response to prompt i: one call samples them all in big batches.
    repeated = [prompt for _ in range(k) for prompt in prompts]
    responses, ended = sample_responses(
        policy,
        tokenizer,
        repeated,
        config.max_new_tokens,
        temperature=config.sampling_temperature,
        batch_size=config.generation_batch_size,
        seed=seed,
        progress=progress,
    )
    golds = gold_scores(repeated, responses, ended)  # the hidden human: for labels and analysis only
    rows = [[j * n + i for j in range(k)] for i in range(n)]
    return Candidates(
        prompts=list(prompts),
        responses=[[responses[r] for r in row] for row in rows],
        ended=[[bool(ended[r]) for r in row] for row in rows],
        golds=[[float(golds[r]) for r in row] for row in rows],
    )


def label_candidates(candidates: Candidates, labeler: PreferenceLabeler, source: str = "simulated") -> list[dict]:
    """Let ``labeler`` compare every pair of responses to each prompt; one record per pair.

    Pairs whose two texts are identical (nothing to prefer) or where a response is empty (not a
    valid record) are skipped, so there can be fewer records than pairs. Prompt order is kept.
    """
    records = []
    for prompt, responses, ended, golds in zip(
        candidates.prompts, candidates.responses, candidates.ended, candidates.golds
    ):
        for a in range(len(responses)):
            for b in range(a + 1, len(responses)):
                if responses[a] == responses[b] or not responses[a].strip() or not responses[b].strip():
                    continue
                chosen, rejected = (a, b) if labeler.prefers_first(golds[a], golds[b]) else (b, a)
                records.append(
                    {
                        "prompt": prompt,
                        "chosen": responses[chosen],
                        "rejected": responses[rejected],
                        "chosen_gold": golds[chosen],
                        "rejected_gold": golds[rejected],
                        "chosen_ended": ended[chosen],
                        "rejected_ended": ended[rejected],
                        "source": source,
                    }
                )
    return records


def build_preferences(
    policy, tokenizer, prompts: Sequence[str], config: PreferenceConfig, seed: int = 0, progress: bool = False
) -> list[dict]:
    """Sample ``config.responses_per_prompt`` responses per prompt from ``policy`` (seed ``seed``),
    score them with the gold and let a simulated labeler (seed ``seed + 1``, temperature
    ``config.labeler_temperature``) compare every pair of them. See ``label_candidates``."""
    if config.responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt must be at least 2, got {config.responses_per_prompt}")
    candidates = sample_candidates(policy, tokenizer, prompts, config, seed, progress)
    return label_candidates(candidates, PreferenceLabeler(temperature=config.labeler_temperature, seed=seed + 1))


def split_preferences(
    records: Sequence[dict], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)``, split by *prompt*: all pairs of a prompt land on the same side, so
    held-out accuracy measures pairs whose prompt the reward model has never seen."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    prompts = sorted({record["prompt"] for record in records})
    random.Random(seed).shuffle(prompts)
    heldout_prompts = set(prompts[: round(heldout_fraction * len(prompts))])
    train = [record for record in records if record["prompt"] not in heldout_prompts]
    heldout = [record for record in records if record["prompt"] in heldout_prompts]
    return train, heldout


def gold_agreement(records: Sequence[dict]) -> float:
    """Share of labels that agree with the noise-free gold order (pairs with a gold tie left out)."""
    gaps = np.array([r["chosen_gold"] - r["rejected_gold"] for r in records if "chosen_gold" in r])
    gaps = gaps[gaps != 0]
    return float((gaps > 0).mean()) if len(gaps) else float("nan")


def labeler_accuracy_cap(records: Sequence[dict], temperature: float) -> float:
    """The accuracy against the *labels* that even a perfect judge (one that knows the gold) can
    only expect: it picks the gold winner, and the labeler agrees with probability
    sigmoid(|gold gap| / T). No reward model trained on these labels should expect more."""
    gaps = [abs(r["chosen_gold"] - r["rejected_gold"]) for r in records if "chosen_gold" in r]
    return float(np.mean([sigmoid(gap / temperature) for gap in gaps])) if gaps else float("nan")
