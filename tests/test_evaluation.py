"""``measure_policy``'s KL against a plain per-token loop, and the gold summaries of the pipeline's rows."""

import math

import numpy as np
import pytest
import torch

from rlhf_core.evaluation import gold_standard_error, gold_summary, measure_policy
from rlhf_core.generation import generate
from rlhf_core.gold import gold_scores
from rlhf_core.models import load_causal_lm
from rlhf_core.prompts import load_prompts


@pytest.fixture(scope="module")
def base_model(tiny_profile):
    """The shipped base model: confident next-token distributions, so the temperature matters."""
    return load_causal_lm(tiny_profile.base_model).eval()


def plain_sequence_kls(policy, reference, batch, temperature: float) -> list[float]:
    """sum over the response tokens of log pi(y_t) - log pi_ref(y_t), both from softmax(logits / temperature):
    one row at a time, padding cut away, every position's log-softmax taken in full, in float64."""
    kls = []
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ids, response = batch.input_ids[row][real], batch.response_mask[row][real]  # (T,) no padding
        total = 0.0
        for model, sign in ((policy, 1.0), (reference, -1.0)):
            with torch.no_grad():
                logits = model(input_ids=ids[None]).logits[0].double()  # (T, V)
            for t in range(1, len(ids)):
                if response[t]:
                    total += sign * float(torch.log_softmax(logits[t - 1] / temperature, -1)[ids[t]])
        kls.append(total)
    return kls


def test_the_kl_is_that_of_the_tempered_distributions_sampled_from(
    base_model, random_tiny_model, tokenizer, tiny_profile
):
    prompts = load_prompts(tiny_profile, "eval", 4)
    temperature, seed = 0.7, 3
    result = measure_policy(
        base_model,
        random_tiny_model,
        None,
        tokenizer,
        prompts,
        max_new_tokens=12,
        temperature=temperature,
        seed=seed,
        batch_size=len(prompts),
    )
    # the very tokens measure_policy sampled: one batch, drawn from a generator seeded the same way
    batch = generate(base_model, tokenizer, prompts, 12, temperature, torch.Generator().manual_seed(seed))
    assert result.responses == batch.responses
    expected = plain_sequence_kls(base_model, random_tiny_model, batch, temperature)
    np.testing.assert_allclose(result.kls, expected, atol=1e-3)
    assert result.kl == pytest.approx(np.mean(expected), abs=1e-3)
    # the log-probs at temperature 1 (what measure_policy used to compute) give another number
    untempered = plain_sequence_kls(base_model, random_tiny_model, batch, 1.0)
    assert np.abs(np.array(untempered) - expected).max() > 0.5
    np.testing.assert_allclose(result.golds, gold_scores(prompts, result.responses, result.ended))
    assert np.isnan(result.reward)  # no reward model given


def test_greedy_decoding_has_no_kl_to_measure(base_model, random_tiny_model, tokenizer):
    with pytest.raises(ValueError, match="greedy"):
        measure_policy(base_model, random_tiny_model, None, tokenizer, ["I watched it."], 4, temperature=0)


def test_gold_standard_error_is_over_prompts_not_samples():
    rng = np.random.default_rng(0)
    prompts, samples = 5, 3
    golds = rng.normal(size=samples * prompts)  # rows j * P + i: the j-th sample of prompt i
    per_prompt = [np.mean([golds[j * prompts + i] for j in range(samples)]) for i in range(prompts)]
    mean = sum(per_prompt) / prompts
    spread = math.sqrt(sum((value - mean) ** 2 for value in per_prompt) / prompts)
    assert gold_standard_error(golds, prompts) == pytest.approx(spread / math.sqrt(prompts))
    with pytest.raises(ValueError):
        gold_standard_error(golds[:-1], prompts)  # not a whole number of samples per prompt


def test_gold_summary_columns():
    golds = [0.5, -0.25, 1.0, 0.0]
    summary = gold_summary(golds, [" good film.", " bad", " a b c", " x y"], [True, False, True, True], 2)
    assert summary == {
        "gold": 0.3125,
        "gold_std": round(float(np.std(golds)), 4),
        "gold_se": round(gold_standard_error(golds, 2), 4),
        "eos_fraction": 0.75,
        "mean_words": 2.0,
    }
