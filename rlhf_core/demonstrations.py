"""Demonstrations: what simulated human writers produce when asked to write a good review.

Supervised fine-tuning learns from *demonstrations*: a prompt and the response a person wrote for
it (Ouyang et al., 2022, hired labelers to write them; here, simulated "demonstrators" do). Real
demonstrators try to write what we asked for, an enthusiastic, well-formed review, but they are
uneven, and a model trained to imitate them inherits their average, flaws included:

- **mood**: each demonstrator has a personal leaning (some gush, some are lukewarm) and their mood
  varies from review to review around it. The distribution leans positive but is wide, so some
  demonstrations are lukewarm or even negative.
- **too long**: now and then a demonstrator rambles on past a reader's patience (5-6 opinions).
- **sloppy**: occasionally a demonstrator pastes a sentence twice or leaves the last one unfinished.

The responses come from the offline world's grammar (``rlhf_core.world``), so the hidden human
(``rlhf_core.gold``) can score them: each record carries its ``gold`` score, **for analysis only**.
SFT never trains on it; it only ever sees ``prompt`` and ``response``. The mean gold of the
demonstrations is the *imitation ceiling*: a policy that imitates perfectly reaches it and no more,
while a policy optimised for gold can reach about 0.85 (the gold of the world's most enthusiastic
reviews). Closing that gap is what the rest of the course is about.

On the ``gpt2`` profile the prompts are IMDB review prefixes ("I rented this movie because"): the
same world-grammar responses follow them. The seams show ("I rented this movie because The acting
was great."), but the demonstrations still define the same imitation target and the same gold.

Records are saved as JSON lines and read back with ``datasets`` (``load_dataset("json", ...)``), the
way real demonstration sets are shipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from datasets import load_dataset

from .gold import gold_score
from .world import ReviewWorld

DEMONSTRATION_SEED = 5_000  # the seed of the course's standard demonstrations (cache file)
EVAL_DEMONSTRATION_SEED = 5_001  # the same demonstrators writing for the held-out eval prompts


@dataclass(frozen=True)
class DemonstratorConfig:
    n_demonstrators: int = 12  # distinct simulated writers, each with a personal leaning
    mood_mean: float = 0.22  # the pool's average mood: they try to be enthusiastic (lean positive)
    leaning_spread: float = 0.12  # std of a demonstrator's personal mean mood around ``mood_mean``
    mood_spread: float = 0.2  # std of one demonstrator's mood from one review to the next (uneven)
    long_probability: float = 0.2  # chance a review rambles on: 5-6 opinions, past a reader's patience
    sloppy_probability: float = 0.15  # chance a review is sloppy: a sentence pasted twice, or an unfinished end


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))


def demonstrator_leanings(config: DemonstratorConfig = DemonstratorConfig()) -> list[float]:
    """Each demonstrator's personal mean mood: evenly spaced quantiles of a normal distribution
    around ``mood_mean``, so the pool is the same people whatever prompts (or seed) they get."""
    normal = NormalDist(config.mood_mean, config.leaning_spread)
    n = config.n_demonstrators
    return [_clip(normal.inv_cdf((i + 0.5) / n)) for i in range(n)]


def _sentences(response: str) -> list[str]:
    """Split a world response (" A. B. C.") into its sentences, each ending with its period."""
    parts = [part.strip() for part in response.strip().split(". ")]
    return [part if part.endswith(".") else part + "." for part in parts if part]


def _make_sloppy(response: str, rng) -> str:
    """A sentence pasted twice, or the last sentence left unfinished (no final punctuation)."""
    sentences = _sentences(response)
    if rng.random() < 0.5 and len(sentences) >= 1:
        position = rng.randrange(len(sentences))
        sentences.insert(position + 1, sentences[position])
        return " " + " ".join(sentences)
    words = response.split()
    cut = rng.randint(1, min(3, max(1, len(words) - 2)))
    return " " + " ".join(words[:-cut]).rstrip(".,!?")


def write_demonstrations(
    prompts: Sequence[str], config: DemonstratorConfig = DemonstratorConfig(), seed: int = DEMONSTRATION_SEED
) -> list[dict]:
    """One demonstration per prompt: ``{"prompt", "response", "gold", "demonstrator", "mood"}``.

    ``gold`` (the hidden human's score), ``demonstrator`` (who wrote it) and ``mood`` (their hidden
    opinion) are for analysis only; SFT trains on ``prompt`` and ``response``. Same prompts, config
    and seed: the same records (one ``random.Random`` stream, no global state).
    """
    world = ReviewWorld(seed)
    rng = world.rng
    leanings = demonstrator_leanings(config)
    records = []
    for prompt in prompts:
        demonstrator = rng.randrange(config.n_demonstrators)
        mood = _clip(rng.gauss(leanings[demonstrator], config.mood_spread))
        long = rng.random() < config.long_probability
        response = world.response(mood, n_sentences=rng.randint(5, 6) if long else None, closing=True if long else None)
        if rng.random() < config.sloppy_probability:
            response = _make_sloppy(response, rng)
        records.append(
            {
                "prompt": prompt,
                "response": response,
                "gold": round(gold_score(prompt, response), 6),
                "demonstrator": demonstrator,
                "mood": round(mood, 6),
            }
        )
    return records


def mean_gold(records) -> float:
    """The demonstrators' mean gold: the score perfect imitation would reach."""
    return float(np.mean(list(records["gold"]) if not isinstance(records, list) else [r["gold"] for r in records]))


def save_demonstrations(path: str | Path, records: Sequence[dict]) -> Path:
    """Write records as JSON lines, atomically (a half-written file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in records))
    partial.replace(path)
    return path


def load_demonstrations(path: str | Path):
    """The records of a JSONL file as a ``datasets.Dataset`` (columns prompt, response, gold, ...)."""
    return load_dataset("json", data_files=str(path), split="train")
