"""The shipped tiny base model: loads offline, writes reviews, ends them with EOS."""

import pytest

from rlhf_core.evaluation import evaluate_policy
from rlhf_core.gold import words
from rlhf_core.models import count_parameters, load_causal_lm
from rlhf_core.prompts import load_prompts
from rlhf_core.world import ADJECTIVES


@pytest.fixture(scope="module")
def base(tiny_profile, tokenizer):
    return load_causal_lm(tiny_profile.base_model)


@pytest.fixture(scope="module")
def base_samples(base, tiny_profile, tokenizer):
    prompts = load_prompts(tiny_profile, "eval", 100)
    return evaluate_policy(base, tokenizer, prompts, tiny_profile.max_new_tokens, seed=0)


def test_shipped_checkpoint_is_the_tiny_shape(base, tiny_profile, tokenizer):
    assert base.config.n_layer == 2 and base.config.n_embd == 128
    assert base.config.vocab_size == len(tokenizer)
    assert 300_000 < count_parameters(base) < 2_000_000


def test_samples_end_with_eos(base_samples):
    assert base_samples.eos_fraction >= 0.9


def test_samples_read_as_reviews(base_samples):
    text = " ".join(base_samples.responses)
    sentiment_words = sum(word in ADJECTIVES for word in words(text))
    assert sentiment_words / len(base_samples.responses) > 1.5  # reviews judge the film
    finished = [r for r, e in zip(base_samples.responses, base_samples.ended) if e]
    assert sum(r.strip()[-1:] in ".!?" for r in finished) / len(finished) > 0.9  # full sentences
    # the base model has no preference yet: both pleased and displeased reviewers appear
    assert (base_samples.golds > 0.3).mean() > 0.2 and (base_samples.golds < -0.3).mean() > 0.1


def test_prompt_splits_are_disjoint_enough(tiny_profile):
    train, held_out = load_prompts(tiny_profile, "train"), load_prompts(tiny_profile, "eval")
    assert len(train) == 4096 and len(held_out) == 256
    assert len(set(held_out) - set(train)) / len(held_out) > 0.8
