"""Best-of-n sampling (rejection sampling): sample n responses, keep the one the reward model likes.

The simplest way to use a reward model needs no training at all: for each prompt draw n responses
from the SFT policy and return the one with the highest reward-model score. WebGPT used it as a
strong baseline that rivalled RL (Nakano et al., 2021), Stiennon et al. (2020) used it to probe
their reward models, and Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization")
measured with it how the gold reward first rises, then falls, as the policy is pushed further from
the SFT policy against an imperfect proxy: best-of-n is the cleanest "optimisation pressure" knob.

**How far does best-of-n move the policy?** Call pi the SFT policy and F(s) = P_{y~pi}(r(x, y) <= s)
the distribution function of the score r under pi, for one prompt x. If the scores are continuous
(no two responses ever tie), the best of n samples has score quantile u = F(r) distributed like
the largest of n uniforms, with density n u^(n-1), so

    pi_bon(y|x) = n F(r(x, y))^(n-1) pi(y|x),
    KL(pi_bon || pi) = E_bon[ log n + (n - 1) log u ] = log n - (n - 1) / n          (``analytic_kl``)

since E[log u] = -1/n under density n u^(n-1). That is the formula of Stiennon et al. (2020,
appendix) and Gao et al. (2022); Beirami et al. (2024, "Theoretical guarantees on the best-of-n
alignment policy") prove it is in fact an *upper bound* on the true KL, and that the bound can be
loose. It is exact only when ties have probability zero. A language model breaks that often:
a small policy repeats its favourite short responses, and several texts may get the same score.

**Measured KL** (``kl_from_samples``, ``measure_kl``). Ties have a simple exact treatment. Group
the responses into *levels* of equal score s_1 < s_2 < ... with probability masses p_k and
distribution function F_k = p_1 + ... + p_k. The best of n lands on level k with probability
F_k^n - F_{k-1}^n and, within a level, on each response in proportion to pi (the n samples are
exchangeable, so whichever tie-break ``select_best`` uses picks uniformly among equal scores).
So pi_bon / pi is constant on a level and

    KL(pi_bon || pi) = sum_k (F_k^n - F_{k-1}^n) log[ (F_k^n - F_{k-1}^n) / p_k ]   (``discrete_kl``)

exactly: the KL over responses equals the KL over score levels. The score distribution of one
prompt is unknown, but it can be *estimated*: draw m >> n responses from pi for the prompt, score
them, and plug their empirical distribution (mass 1/m per sample, equal scores grouped, a response
drawn twice is a tie) into the formula. This plug-in estimate

- equals the discrete formula for m distinct atoms when the m scores are distinct, which is already
  within 0.1% of log n - (n - 1)/n for m = 100, n <= 16 (and within 0.6% at n = 64): without ties
  the measurement confirms the analytic value and tells nothing new;
- is lower than the analytic value by as much as the policy's ties matter: ties low in the score
  order change little, but a policy that already writes its best-scored response half the time
  cannot be moved far by best-of-n (0.67 nats instead of 1.20 at n = 8), and the measurement says so;
- has the usual plug-in bias of a finite sample: a tie that m samples do not reveal is missed
  (the estimate errs towards the analytic upper bound), so use m of a few hundred per prompt.

What it does *not* measure is the KL of a best-of-n policy with a *different* tie-break or a
stochastic scorer; ``score_fn`` must be a deterministic function of (prompt, response, ended).

**Gold-versus-n curves.** ``expected_best_of_n`` computes the expected gold (or any other score)
of best-of-n from N >= n scored samples per prompt with the unbiased estimator of Gao et al.
(2022): averaged over every subset of size n of the N samples, at no more sampling cost than the
largest n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .generation import sample_responses
from .reward_model import score_texts

ScoreFn = Callable[[Sequence[str], Sequence[str], Sequence[bool]], np.ndarray]
"""score_fn(prompts, responses, ended) -> (N,) scores; higher is better. E.g. ``gold.gold_scores``
(an oracle upper bound) or ``reward_model_score_fn(...)`` (the real thing)."""


@dataclass
class BestOfNResult:
    prompts: list[str]  # the P prompts, in order
    responses: list[str]  # (P,) the chosen response of each prompt
    ended: list[bool]  # (P,) whether the chosen response produced EOS
    scores: np.ndarray  # (P,) the score_fn score of the chosen response
    chosen_index: np.ndarray  # (P,) which candidate (0..n-1) was chosen
    all_scores: np.ndarray  # (P, n) the score of every candidate
    candidates: list[list[str]] = field(repr=False)  # (P, n) every sampled response
    candidates_ended: list[list[bool]] = field(repr=False)  # (P, n) their EOS flags

    @property
    def n(self) -> int:
        return self.all_scores.shape[1]


def reward_model_score_fn(reward_model, tokenizer, batch_size: int = 64, normalize: bool = True) -> ScoreFn:
    """A ``score_fn`` reading the reward model of chapter 03 (``rlhf_core.reward_model.score_texts``)."""

    def score(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> np.ndarray:
        return np.asarray(
            score_texts(
                reward_model,
                tokenizer,
                list(prompts),
                list(responses),
                batch_size,
                normalize=normalize,
                ended=list(ended),
            ),
            dtype=float,
        )

    return score


def select_best(all_scores: np.ndarray) -> np.ndarray:
    """Index of the highest score in each row, (P, n) -> (P,). Ties go to the first candidate: the
    candidates are exchangeable samples, so this picks uniformly among equal scores in distribution."""
    all_scores = np.asarray(all_scores, dtype=float)
    if np.isnan(all_scores).any():
        raise ValueError("a score is NaN: best-of-n cannot rank it")
    return all_scores.argmax(axis=1)


def sample_candidates(
    policy,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 1.0,
    progress: bool = False,
) -> tuple[list[list[str]], list[list[bool]]]:
    """n responses per prompt, (P, n) nested lists of texts and EOS flags.

    Sampled in one call on ``prompts * n``, so row j * P + i is the j-th response to prompt i:
    exactly what ``sample_responses(policy, tokenizer, prompts * n, ...)`` returns with the same
    seed and batch size (and what ``evaluation.measure_policy`` samples on ``prompts * n``). For
    n = 1 that is plain sampling: best-of-1 *is* ``sample_responses(prompts)``. For n > 1 the first
    P rows are one sample of each prompt, but they are ``sample_responses(prompts)``'s only when P
    is a multiple of ``batch_size``: otherwise the last batch of prompts shares its batch, hence its
    random draws, with rows of the next copy."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    prompts = list(prompts)
    responses, ended = sample_responses(
        policy, tokenizer, prompts * n, max_new_tokens, temperature, batch_size=batch_size, seed=seed, progress=progress
    )
    return candidates_from_rows(responses, ended, len(prompts))


def candidates_from_rows(
    responses: Sequence[str], ended: Sequence[bool], count: int
) -> tuple[list[list[str]], list[list[bool]]]:
    """Samples laid out as rows j * P + i (the j-th sample of prompt i, ``count`` = P prompts, as
    ``sample_candidates`` draws them) regrouped per prompt: (P, n) nested lists of texts and EOS flags."""
    if count < 1 or len(responses) % count or len(ended) != len(responses):
        raise ValueError(f"{len(responses)} responses and {len(ended)} EOS flags are not n rows of {count} prompts")
    n = len(responses) // count
    candidates = [[responses[j * count + i] for j in range(n)] for i in range(count)]
    candidates_ended = [[bool(ended[j * count + i]) for j in range(n)] for i in range(count)]
    return candidates, candidates_ended


def score_candidates(
    prompts: Sequence[str], candidates: list[list[str]], candidates_ended: list[list[bool]], score_fn: ScoreFn
) -> np.ndarray:
    """score_fn of every candidate in one call, (P, n)."""
    n = len(candidates[0]) if candidates else 0
    flat_prompts = [prompt for prompt in prompts for _ in range(n)]
    flat_responses = [response for row in candidates for response in row]
    flat_ended = [flag for row in candidates_ended for flag in row]
    scores = np.asarray(score_fn(flat_prompts, flat_responses, flat_ended), dtype=float)
    if scores.shape != (len(flat_responses),):
        raise ValueError(f"score_fn returned shape {scores.shape} for {len(flat_responses)} responses")
    return scores.reshape(len(prompts), n)


def best_of_n(
    policy,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    score_fn: ScoreFn,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 1.0,
    progress: bool = False,
) -> BestOfNResult:
    """Sample ``n`` responses per prompt from ``policy`` and keep the one ``score_fn`` scores highest."""
    candidates, candidates_ended = sample_candidates(
        policy, tokenizer, prompts, n, max_new_tokens, seed, batch_size, temperature, progress
    )
    return choose_best(prompts, candidates, candidates_ended, score_fn)


def choose_best(
    prompts: Sequence[str], candidates: list[list[str]], candidates_ended: list[list[bool]], score_fn: ScoreFn
) -> BestOfNResult:
    """Score every candidate (P, n) and keep the best of each prompt: best-of-n on samples already drawn."""
    prompts = list(prompts)
    all_scores = score_candidates(prompts, candidates, candidates_ended, score_fn)  # (P, n)
    chosen = select_best(all_scores)  # (P,)
    rows = np.arange(len(prompts))
    return BestOfNResult(
        prompts=prompts,
        responses=[candidates[i][j] for i, j in zip(rows, chosen)],
        ended=[candidates_ended[i][j] for i, j in zip(rows, chosen)],
        scores=all_scores[rows, chosen],
        chosen_index=chosen,
        all_scores=all_scores,
        candidates=candidates,
        candidates_ended=candidates_ended,
    )


# ----------------------------------------------------------------------------------------------
# KL(pi_bon || pi)


def analytic_kl(n: int | np.ndarray) -> float | np.ndarray:
    """log n - (n - 1) / n: KL(pi_bon || pi) for tie-free scores, an upper bound otherwise (nats)."""
    n = np.asarray(n, dtype=float)
    if (n < 1).any():
        raise ValueError("n must be at least 1")
    value = np.log(n) - (n - 1) / n
    return float(value) if value.ndim == 0 else value


def best_of_n_probabilities(probabilities: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Exact best-of-n distribution over the outcomes of a categorical distribution, (K,) -> (K,).

    Outcome i has probability ``probabilities[i]`` and score ``scores[i]``. Outcomes of equal score
    form a level; level k is chosen with probability F_k^n - F_{k-1}^n, shared within the level in
    proportion to ``probabilities`` (see the module docstring)."""
    probabilities = np.asarray(probabilities, dtype=float)
    scores = np.asarray(scores, dtype=float)
    levels, level_of = np.unique(scores, return_inverse=True)  # levels sorted ascending
    level_mass = np.bincount(level_of, weights=probabilities, minlength=len(levels))  # (L,)
    total = level_mass.sum()
    cdf = np.cumsum(level_mass) / total  # (L,) F_k
    previous = np.concatenate([[0.0], cdf[:-1]])  # (L,) F_{k-1}
    level_bon = cdf**n - previous**n  # (L,)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(level_mass[level_of] > 0, probabilities / level_mass[level_of], 0.0)  # (K,)
    return level_bon[level_of] * share


def discrete_kl(probabilities: np.ndarray, scores: np.ndarray, n: int) -> float:
    """Exact KL(pi_bon || pi) in nats for a categorical pi over outcomes with these scores."""
    probabilities = np.asarray(probabilities, dtype=float)
    probabilities = probabilities / probabilities.sum()
    bon = best_of_n_probabilities(probabilities, scores, n)
    support = bon > 0
    return float(np.sum(bon[support] * np.log(bon[support] / probabilities[support])))


def kl_from_samples(sample_scores: np.ndarray, n: int) -> np.ndarray:
    """Plug-in estimate of KL(pi_bon || pi) per prompt from m scored samples of pi, (P, m) -> (P,).

    Each row's m samples get mass 1/m and equal scores are grouped into one level (see the module
    docstring): ``discrete_kl`` of the empirical distribution. Needs m >> n to see the ties."""
    sample_scores = np.atleast_2d(np.asarray(sample_scores, dtype=float))
    m = sample_scores.shape[1]
    return np.array([discrete_kl(np.full(m, 1.0 / m), row, n) for row in sample_scores])


def measure_kl(
    policy,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    score_fn: ScoreFn,
    max_new_tokens: int,
    samples_per_prompt: int = 256,
    seed: int = 0,
    batch_size: int = 64,
    temperature: float = 1.0,
    progress: bool = False,
) -> dict:
    """Measured KL(pi_bon || pi) of best-of-n with ``score_fn`` on ``prompts``: ``samples_per_prompt``
    responses per prompt from ``policy``, scored, then ``kl_from_samples``. Returns the mean
    (``kl``), the per-prompt values (``per_prompt``), ``analytic`` (the tie-free value) and the share
    of samples whose score ties with another sample of their prompt (``tied_fraction``)."""
    candidates, candidates_ended = sample_candidates(
        policy, tokenizer, prompts, samples_per_prompt, max_new_tokens, seed, batch_size, temperature, progress
    )
    scores = score_candidates(list(prompts), candidates, candidates_ended, score_fn)  # (P, m)
    per_prompt = kl_from_samples(scores, n)
    tied = [np.unique(row, return_counts=True)[1] for row in scores]
    tied_fraction = float(np.mean([counts[counts > 1].sum() / scores.shape[1] for counts in tied]))
    return {
        "kl": float(per_prompt.mean()),
        "per_prompt": per_prompt,
        "analytic": analytic_kl(n),
        "tied_fraction": tied_fraction,
        "n": n,
        "samples_per_prompt": samples_per_prompt,
    }


# ----------------------------------------------------------------------------------------------
# Expected scores of best-of-n from a larger sample


def expected_best_of_n(proxy_scores: np.ndarray, target_scores: np.ndarray, n: int) -> np.ndarray:
    """Expected ``target`` score of the response best-of-n picks by ``proxy``, per prompt, (P, N) -> (P,).

    Averages over all C(N, n) subsets of the N samples of each prompt without listing them (Gao et
    al., 2022, appendix): with the samples sorted by proxy score, the k-th smallest (1-based) is the
    best of a random n-subset with probability C(k - 1, n - 1) / C(N, n). Samples tied on the proxy
    get the mean target of their tie group (best-of-n picks uniformly among them). Use the
    reward-model scores as proxy and the gold as target for the overoptimisation curve, or the same
    scores twice for the proxy's own curve."""
    proxy_scores = np.atleast_2d(np.asarray(proxy_scores, dtype=float))
    target_scores = np.atleast_2d(np.asarray(target_scores, dtype=float))
    if proxy_scores.shape != target_scores.shape:
        raise ValueError(f"proxy {proxy_scores.shape} and target {target_scores.shape} shapes differ")
    total = proxy_scores.shape[1]
    if not 1 <= n <= total:
        raise ValueError(f"n must be between 1 and the {total} samples per prompt, got {n}")
    weights = np.array([math.comb(k - 1, n - 1) for k in range(1, total + 1)], dtype=float) / math.comb(total, n)
    expected = np.empty(len(proxy_scores))
    for row, (proxy, target) in enumerate(zip(proxy_scores, target_scores)):
        levels, level_of = np.unique(proxy, return_inverse=True)
        level_mean = np.bincount(level_of, weights=target) / np.bincount(level_of)
        order = np.argsort(proxy, kind="stable")
        expected[row] = float(np.dot(weights, level_mean[level_of[order]]))
    return expected


def best_of_k_curve(rewards: np.ndarray, golds: np.ndarray, n: int) -> dict[str, list]:
    """Best-of-k for k = 1, 2, 4, ... up to n, from the same (P, N >= n) scored samples at no extra
    sampling: the analytic KL, the expected gold and the expected reward of each k (k = 1 is plain
    sampling). ``rewards`` picks (the proxy), ``golds`` is what the pick is worth."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k < n] + [n]
    return {
        "n": ks,
        "kl": [float(analytic_kl(k)) for k in ks],
        "gold": [float(expected_best_of_n(rewards, golds, k).mean()) for k in ks],
        "reward": [float(expected_best_of_n(rewards, rewards, k).mean()) for k in ks],
    }
