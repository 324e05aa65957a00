import math
import random

import numpy as np
import pytest

from rlhf_core import world
from rlhf_core.gold import (
    GoldConfig,
    PreferenceLabeler,
    gold_breakdown,
    gold_score,
    gold_scores,
    make_raters,
    mean_gold_breakdown,
    repeated_trigram_fraction,
    sigmoid,
)

PROMPT = "I watched The Quiet Harbor last night."


def test_negation_lowers_a_positive_sentence():
    assert gold_score(PROMPT, " The acting was not good.") < gold_score(PROMPT, " The acting was good.") - 0.5


def test_intensifier_raises_and_contrast_follows_the_second_clause():
    assert gold_score(PROMPT, " The acting was really good.") > gold_score(PROMPT, " The acting was good.")
    assert gold_score(PROMPT, " The plot was bad, but the music was good.") > 0
    assert gold_score(PROMPT, " The plot was good, but the music was bad.") < 0


def test_repetition_is_penalised():
    once = " The music was great. I loved the ending."
    looped = " The music was great. The music was great. The music was great. The music was great."
    assert gold_score(PROMPT, looped) < gold_score(PROMPT, once) - 0.5
    assert gold_breakdown(PROMPT, looped)["repetition"] < 0 == gold_breakdown(PROMPT, once)["repetition"]
    # copying the prompt counts as repetition too
    assert repeated_trigram_fraction(PROMPT, " I watched The Quiet Harbor last night.") == 1.0


def test_missing_eos_and_unfinished_sentence_are_penalised():
    text = " The music was great."
    config = GoldConfig()
    assert gold_score(PROMPT, text, ended=False) == pytest.approx(gold_score(PROMPT, text) - config.no_eos_penalty)
    assert gold_score(PROMPT, " The music was great and", ended=True) < gold_score(PROMPT, text)


def test_a_response_pays_one_ending_penalty_never_two():
    """Cut off by the length limit, a response is mid-sentence by nature: it pays for not ending
    (``no_eos_penalty``) and nothing more. The punctuation rule is for a response that chose to end."""
    config = GoldConfig()
    finished, unfinished = " The music was great.", " The music was great and the"
    ending = {
        (text, ended): gold_breakdown(PROMPT, text, ended)["ending"]
        for text in (finished, unfinished)
        for ended in (True, False)
    }
    assert ending[finished, True] == 0.0
    assert ending[unfinished, True] == -config.no_final_punctuation_penalty  # ended, but mid-sentence
    assert ending[finished, False] == -config.no_eos_penalty
    assert ending[unfinished, False] == -config.no_eos_penalty  # not -(0.5 + 0.25)
    # the other parts do not care how the response ended: gold moves by exactly the ending penalty
    assert gold_score(PROMPT, unfinished, ended=False) == pytest.approx(
        gold_score(PROMPT, unfinished, ended=True) + config.no_final_punctuation_penalty - config.no_eos_penalty
    )


def test_rambling_past_the_natural_length_is_penalised():
    sentences = [f" The {aspect} was great." for aspect in world.ASPECTS]  # all different: no repetition
    short, long = "".join(sentences[:3]), "".join(sentences[:15])
    assert gold_breakdown(PROMPT, short)["rambling"] == 0
    assert gold_breakdown(PROMPT, long)["rambling"] < -0.5
    assert gold_score(PROMPT, long) < gold_score(PROMPT, short)


def test_empty_response_is_the_worst():
    assert gold_score(PROMPT, "") == GoldConfig().empty_response_score
    assert gold_score(PROMPT, "   ") == GoldConfig().empty_response_score


def test_gold_scores_vectorised_and_checks_lengths():
    reviews = world.sample_reviews(20, seed=4)
    prompts, responses = [r.prompt for r in reviews], [r.response for r in reviews]
    assert np.allclose(gold_scores(prompts, responses), [gold_score(p, r) for p, r in zip(prompts, responses)])
    with pytest.raises(ValueError):
        gold_scores(prompts, responses[:-1])


def test_gold_follows_the_hidden_mood():
    reviews = world.sample_reviews(1000, seed=5)
    golds = gold_scores([r.prompt for r in reviews], [r.response for r in reviews])
    assert np.corrcoef(golds, [r.mood for r in reviews])[0, 1] > 0.7


@pytest.mark.parametrize("temperature", [0.1, 0.3, 1.0])
def test_labelers_agree_with_gold_at_the_rate_their_noise_implies(temperature):
    rng = random.Random(0)
    labeler = PreferenceLabeler(temperature=temperature, seed=1)
    pairs = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in range(20_000)]
    agree = np.mean([labeler.prefers_first(a, b) == (a > b) for a, b in pairs])
    implied = np.mean([sigmoid(abs(a - b) / temperature) for a, b in pairs])
    assert abs(agree - implied) < 0.01  # ~3 standard errors at n = 20k
    assert 0.5 < implied < 1.0


def test_labeler_is_seeded_and_a_zero_gap_is_a_coin_flip():
    first = [PreferenceLabeler(0.2, seed=3).prefers_first(0.1, 0.3) for _ in range(5)]
    again = [PreferenceLabeler(0.2, seed=3).prefers_first(0.1, 0.3) for _ in range(5)]
    assert first == again
    assert PreferenceLabeler(0.2).probability_first_preferred(0.4, 0.4) == 0.5
    assert sigmoid(-800.0) == pytest.approx(0.0) and sigmoid(800.0) == 1.0 and math.isclose(sigmoid(0), 0.5)


def test_raters_disagree_on_absolute_scores_but_rank_alike():
    raters = make_raters(5, seed=0)
    golds = list(np.linspace(-0.9, 0.9, 40))
    scores = np.array([rater.score_session(golds) for rater in raters])  # (raters, items)
    assert scores.min() >= 1 and scores.max() <= 10
    # their means differ by more than a point: "your 7 is another person's 9"
    assert scores.mean(axis=1).max() - scores.mean(axis=1).min() > 1.0
    # yet every rater's scores rise with quality
    for row in scores:
        assert np.corrcoef(row, golds)[0, 1] > 0.6


def test_mean_gold_breakdown_averages_each_part():
    prompts = ["Zorvath is a western.", "I watched Nimbrook."]
    responses = [" The acting was great. The acting was great. The acting was great.", " Dull and not bad"]
    ended = [True, False]
    means = mean_gold_breakdown(prompts, responses, ended)
    assert means["gold"] == pytest.approx(float(gold_scores(prompts, responses, ended).mean()))
    parts = sum(value for key, value in means.items() if key != "gold")
    assert parts == pytest.approx(means["gold"])
    assert means["repetition"] < 0 and means["ending"] < 0
