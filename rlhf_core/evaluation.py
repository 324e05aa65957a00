"""Scoring a policy with the hidden human: sample on held-out prompts, read the gold.

Every stage of the course (base, SFT, PPO, DPO, best-of-n) is measured the same way: one
response per held-out prompt at temperature 1, then the mean gold score, the fraction of
responses that ended with EOS and their mean length. Only the learner sees these numbers; no
training signal ever comes from ``gold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .generation import sample_responses
from .gold import gold_scores


@dataclass
class PolicyEvaluation:
    gold: float  # mean gold score over the prompts
    gold_std: float  # spread of the gold scores
    eos_fraction: float  # share of responses that ended with EOS before the length limit
    mean_words: float  # mean response length in words
    prompts: list[str] = field(repr=False)  # the prompts, in order
    responses: list[str] = field(repr=False)  # one sampled response per prompt
    ended: list[bool] = field(repr=False)  # whether each response produced EOS
    golds: np.ndarray = field(repr=False)  # per-response gold scores

    def summary(self) -> dict[str, float]:
        return {"gold": round(self.gold, 4), "gold_std": round(self.gold_std, 4),
                "eos_fraction": round(self.eos_fraction, 4), "mean_words": round(self.mean_words, 2)}


def evaluate_policy(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 128, progress: bool = False) -> PolicyEvaluation:
    """Sample one response per prompt and score it with the gold (the learner's view only)."""
    responses, ended = sample_responses(model, tokenizer, prompts, max_new_tokens, temperature,
                                        batch_size=batch_size, seed=seed, progress=progress)
    golds = gold_scores(prompts, responses, ended)
    return PolicyEvaluation(
        gold=float(golds.mean()), gold_std=float(golds.std()),
        eos_fraction=float(np.mean(ended)), mean_words=float(np.mean([len(r.split()) for r in responses])),
        prompts=list(prompts), responses=responses, ended=ended, golds=golds)
