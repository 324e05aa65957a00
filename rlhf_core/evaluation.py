"""Scoring a policy with the hidden human: sample on held-out prompts, read the gold.

Every stage of the course (base, SFT, PPO, DPO, best-of-n) is measured the same way: one
response per held-out prompt at temperature 1, then the mean gold score, the fraction of
responses that ended with EOS and their mean length. Only the learner sees these numbers; no
training signal ever comes from ``gold``. ``precision`` (fp32, bf16, fp16; None: ``RLHF_PRECISION``,
else auto) decides how the forward passes run (``rlhf_core.precision``); rewards and KL are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .generation import generate, sample_responses
from .gold import gold_scores
from .logprobs import response_logprobs
from .precision import autocast, resolve_precision
from .reward_model import score_batch


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
        return {
            "gold": round(self.gold, 4),
            "gold_std": round(self.gold_std, 4),
            "eos_fraction": round(self.eos_fraction, 4),
            "mean_words": round(self.mean_words, 2),
        }


def evaluate_policy(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
    precision: str | None = None,
) -> PolicyEvaluation:
    """Sample one response per prompt and score it with the gold (the learner's view only)."""
    responses, ended = sample_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        precision=precision,
    )
    return PolicyEvaluation(**_gold_fields(prompts, responses, ended))


def _gold_fields(prompts: list[str], responses: list[str], ended: list[bool]) -> dict:
    """The ``PolicyEvaluation`` fields of sampled responses: gold mean and spread, EOS share, length."""
    golds = gold_scores(prompts, responses, ended)
    return dict(
        gold=float(golds.mean()),
        gold_std=float(golds.std()),
        eos_fraction=float(np.mean(ended)),
        mean_words=float(np.mean([len(r.split()) for r in responses])),
        prompts=list(prompts),
        responses=responses,
        ended=ended,
        golds=golds,
    )


def gold_standard_error(golds, prompt_count: int) -> float:
    """Standard error of a mean gold over ``prompt_count`` prompts, the samples laid out as rows
    j * P + i (the j-th sample of prompt i): the spread of the per-prompt means (samples of one
    prompt are not independent of each other) over sqrt(P)."""
    per_prompt = np.asarray(golds, dtype=float).reshape(-1, prompt_count).mean(axis=0)  # (P,)
    return float(per_prompt.std() / math.sqrt(prompt_count))


def gold_summary(golds, responses: Sequence[str], ended: Sequence[bool], prompt_count: int) -> dict[str, float]:
    """The gold columns of a report for scored responses however they were drawn (rows j * P + i):
    mean, spread and standard error of the gold, share that ended with EOS, mean length in words."""
    golds = np.asarray(golds, dtype=float)
    return {
        "gold": round(float(golds.mean()), 4),
        "gold_std": round(float(golds.std()), 4),
        "gold_se": round(gold_standard_error(golds, prompt_count), 4),
        "eos_fraction": round(float(np.mean(ended)), 4),
        "mean_words": round(float(np.mean([len(r.split()) for r in responses])), 2),
    }


@dataclass
class PolicyMeasurement(PolicyEvaluation):
    """``PolicyEvaluation`` plus what the reward model and the reference say of the same responses."""

    reward: float = 0.0  # mean reward-model score (normalised: the SFT policy scores 0 +- 1)
    kl: float = 0.0  # mean KL(pi || pi_ref) per response in nats: E[sum_t log pi(y_t) - log pi_ref(y_t)],
    #                  both at the sampling temperature
    rewards: np.ndarray = field(default=None, repr=False)  # per-response reward-model scores
    kls: np.ndarray = field(default=None, repr=False)  # per-response summed log-ratios

    def summary(self) -> dict[str, float]:
        return {**super().summary(), "reward": round(self.reward, 4), "kl": round(self.kl, 4)}


@torch.no_grad()
def measure_policy(
    policy,
    reference,
    reward_model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
    precision: str | None = None,
) -> PolicyMeasurement:
    """One response per prompt from ``policy``, scored three ways on the very tokens sampled:
    gold (the hidden human), the reward model (normalised, read at the last real token) and the
    KL to the reference, sum over response tokens of log pi - log pi_ref (k1, unbiased for the
    sequence-level KL because the tokens come from pi). Every stage of the pipeline (SFT, PPO, DPO)
    is measured with this one function on the same held-out prompts.

    The responses are drawn from softmax(logits / ``temperature``), so the KL is that of the
    tempered distributions: both log-probs are computed at ``temperature`` (the KL between what pi
    actually samples from and pi_ref at the same temperature). Temperature 0 (greedy) has no KL:
    pass ``reference=None`` for it.

    ``reward_model`` may be None (reward reported as nan); ``reference`` None means pi_ref = pi.
    """
    if reference is not None and temperature <= 0:
        raise ValueError(
            f"temperature {temperature}: greedy decoding has no KL to a reference; "
            "sample at a temperature > 0 or pass reference=None"
        )
    device = next(policy.parameters()).device
    precision = resolve_precision(precision, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    responses, ended, rewards, kls = [], [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="measuring", disable=not progress):
        batch = generate(
            policy, tokenizer, prompts[start : start + batch_size], max_new_tokens, temperature, generator, precision
        )
        responses += batch.responses
        ended += batch.ended.tolist()
        if reward_model is not None:
            with autocast(device, precision):
                rewards.append(score_batch(reward_model, batch.input_ids, batch.attention_mask).float().cpu())
        if reference is not None:
            sampled = (batch.input_ids, batch.attention_mask, batch.response_mask)
            with autocast(device, precision):
                log_ratio = response_logprobs(policy, *sampled, temperature=temperature) - response_logprobs(
                    reference, *sampled, temperature=temperature
                )  # (B, T) float32
            kls.append(log_ratio.sum(-1).float().cpu())  # (B,)
    reward_values = torch.cat(rewards).numpy() if rewards else np.full(len(prompts), np.nan)
    kl_values = torch.cat(kls).numpy() if kls else np.zeros(len(prompts))
    return PolicyMeasurement(
        **_gold_fields(prompts, responses, ended),
        reward=float(reward_values.mean()),
        kl=float(kl_values.mean()),
        rewards=reward_values,
        kls=kl_values,
    )
