"""The hidden human: a gold scorer and simulated labelers built on it.

A real lab never sees the "true" quality of a response; it sees noisy human labels. In this
course we *know* the truth, because we define it. ``gold_score`` stands in for a careful human
reader who wants an enthusiastic, well-formed movie review:

    gold(x, y) = VADER compound sentiment of y                 in [-1, 1]  (Hutto & Gilbert, 2014)
                 - repetition penalty  (repeated word trigrams, also ones copied from the prompt x)
                 - rambling penalty    (words past a natural length)
                 - ending penalty      (no EOS; or an EOS after an unfinished sentence)

The reward model never calls this function; it only sees the labels of the *simulated labelers*:

- ``PreferenceLabeler``: compares two responses through a Bradley-Terry model with a noise
  temperature: P(A preferred over B) = sigmoid((gold_A - gold_B) / temperature).
  (Bradley & Terry, 1952; the same model the reward model's loss assumes, Christiano et al., 2017.)
- ``Rater``: gives absolute 1-10 scores with a personal offset, scale and drift over a session,
  plus noise: why absolute scores disagree across people while comparisons agree (chapter 01).

Everything that decides is seeded: the same seed gives the same labels.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_ANALYZER: SentimentIntensityAnalyzer | None = None
_WORD = re.compile(r"[a-z']+")


def _analyzer() -> SentimentIntensityAnalyzer:
    global _ANALYZER
    if _ANALYZER is None:  # loading the lexicon takes ~0.1 s: do it once
        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def sentiment(text: str) -> float:
    """VADER's compound sentiment of ``text``, in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


@dataclass(frozen=True)
class GoldConfig:
    natural_words: int = 40  # a reader's patience: words past this count as rambling
    ramble_penalty_per_word: float = 0.03  # gold lost per word past the natural length
    max_ramble_penalty: float = 1.0  # rambling can cost at most this much
    repetition_weight: float = 1.5  # gold lost per unit fraction of repeated word trigrams
    no_eos_penalty: float = 0.5  # never ended (hit the length limit): its only ending penalty
    no_final_punctuation_penalty: float = 0.25  # ended (EOS), but mid-sentence
    empty_response_score: float = -1.0  # an empty answer is as bad as the worst review


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_trigram_fraction(prompt: str, response: str) -> float:
    """Fraction of the response's word trigrams already seen earlier (in the prompt or response)."""
    response_words = words(response)
    trigrams = [tuple(response_words[i : i + 3]) for i in range(len(response_words) - 2)]
    if not trigrams:
        return 0.0
    prompt_words = words(prompt)
    seen = {tuple(prompt_words[i : i + 3]) for i in range(len(prompt_words) - 2)}
    repeats = 0
    for trigram in trigrams:
        repeats += trigram in seen
        seen.add(trigram)
    return repeats / len(trigrams)


def gold_breakdown(
    prompt: str, response: str, ended: bool = True, config: GoldConfig = GoldConfig()
) -> dict[str, float]:
    """The gold score and its parts, for plots and for explaining a score to a learner."""
    text = response.strip()
    if not text:
        return {
            "sentiment": 0.0,
            "repetition": 0.0,
            "rambling": 0.0,
            "ending": 0.0,
            "gold": config.empty_response_score,
        }
    n_words = len(words(text))
    parts = {
        "sentiment": sentiment(text),
        "repetition": -config.repetition_weight * repeated_trigram_fraction(prompt, text),
        "rambling": -min(
            config.max_ramble_penalty, config.ramble_penalty_per_word * max(0, n_words - config.natural_words)
        ),
        "ending": 0.0,
    }
    # One ending penalty, never both: a response cut off by the length limit is mid-sentence by
    # nature and already pays for not ending; the punctuation rule is for responses that chose to end.
    if not ended:
        parts["ending"] -= config.no_eos_penalty
    elif text[-1] not in ".!?":
        parts["ending"] -= config.no_final_punctuation_penalty
    parts["gold"] = sum(parts.values())
    return parts


def mean_gold_breakdown(
    prompts: Sequence[str],
    responses: Sequence[str],
    ended: Sequence[bool] | None = None,
    config: GoldConfig = GoldConfig(),
) -> dict[str, float]:
    """The mean of each part of ``gold_breakdown`` over many responses: which rule a policy breaks."""
    ended = [True] * len(responses) if ended is None else list(ended)
    parts = [gold_breakdown(p, r, e, config) for p, r, e in zip(prompts, responses, ended)]
    return {key: float(np.mean([part[key] for part in parts])) for key in parts[0]}


def gold_score(prompt: str, response: str, ended: bool = True, config: GoldConfig = GoldConfig()) -> float:
    """What the hidden human thinks of ``response`` to ``prompt``; ``ended``: EOS was produced."""
    return gold_breakdown(prompt, response, ended, config)["gold"]


def gold_scores(
    prompts: Sequence[str],
    responses: Sequence[str],
    ended: Sequence[bool] | None = None,
    config: GoldConfig = GoldConfig(),
) -> np.ndarray:
    """``gold_score`` for many responses at once, as a float array."""
    if ended is None:
        ended = [True] * len(responses)
    if not len(prompts) == len(responses) == len(ended):
        raise ValueError(f"got {len(prompts)} prompts, {len(responses)} responses, {len(ended)} ended flags")
    return np.array([gold_score(p, r, bool(e), config) for p, r, e in zip(prompts, responses, ended)])


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass
class PreferenceLabeler:
    """A simulated person comparing two responses (Bradley-Terry on gold, with noise).

    ``temperature`` is the labeler's noise: a gold gap of one temperature is preferred correctly
    73% of the time (sigmoid(1)); near 0 the labeler always follows gold, large values are coin flips.
    """

    temperature: float = 0.25  # gold gap at which the labeler is right sigmoid(1) = 73% of the time
    seed: int = 0  # the labeler's own random stream
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def probability_first_preferred(self, gold_first: float, gold_second: float) -> float:
        return sigmoid((gold_first - gold_second) / self.temperature)

    def prefers_first(self, gold_first: float, gold_second: float) -> bool:
        """One noisy comparison: True when the first response is chosen."""
        return self.rng.random() < self.probability_first_preferred(gold_first, gold_second)


@dataclass
class Rater:
    """A simulated person giving absolute 1-10 scores: offset, scale and drift differ per person.

    score = clip(round(offset + 5.5 + 4.5 * scale * gold + drift * progress + noise), 1, 10)
    where ``progress`` goes from 0 to 1 over the labelling session (tiredness, changing standards).
    """

    offset: float  # personal generosity: this rater's 7 is another's 9
    scale: float  # how strongly the rater reacts to quality differences
    drift: float  # how much the rater's standard moves over a session (points, start to end)
    noise: float  # standard deviation of a single score
    seed: int = 0  # the rater's own random stream
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def score(self, gold: float, progress: float = 0.0) -> int:
        value = (
            self.offset
            + 5.5
            + 4.5 * self.scale * max(-1.0, min(1.0, gold))
            + self.drift * progress
            + self.rng.gauss(0.0, self.noise)
        )
        return int(min(10, max(1, round(value))))

    def score_session(self, golds: Sequence[float]) -> list[int]:
        """Score items in order; the rater drifts as the session goes on."""
        n = max(1, len(golds) - 1)
        return [self.score(g, i / n) for i, g in enumerate(golds)]


def make_raters(n: int, seed: int = 0, noise: float = 0.8) -> list[Rater]:
    """``n`` raters with different offsets, scales and drifts."""
    rng = random.Random(seed)
    return [
        Rater(
            offset=rng.uniform(-2.0, 2.0),
            scale=rng.uniform(0.5, 1.3),
            drift=rng.uniform(-2.0, 2.0),
            noise=noise,
            seed=seed * 1000 + i,
        )
        for i in range(n)
    ]
