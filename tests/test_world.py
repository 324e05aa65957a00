from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_core import world
from rlhf_core.gold import sentiment


def test_same_seed_same_reviews_different_seed_different_reviews():
    assert world.sample_reviews(50, seed=7) == world.sample_reviews(50, seed=7)
    assert world.sample_reviews(50, seed=7) != world.sample_reviews(50, seed=8)
    assert world.sample_prompts(20, 1) == world.sample_prompts(20, 1)


def test_sentiment_words_are_in_vader_lexicon_with_their_valence():
    lexicon = SentimentIntensityAnalyzer().lexicon
    for table in (world.ADJECTIVES, world.VERBS):
        for word, valence in table.items():
            assert lexicon[word] == valence, word


def test_reviews_have_the_documented_shape():
    for review in world.sample_reviews(200, seed=0):
        assert review.response.startswith(" ") and not review.response.startswith("  ")
        assert review.response.rstrip()[-1] in ".!?"
        assert review.text == review.prompt + review.response
        assert -1.0 <= review.mood <= 1.0


def test_grammar_uses_negation_contrast_and_modifiers():
    text = " ".join(r.response for r in world.sample_reviews(300, seed=1))
    assert " not " in text and ", but " in text
    assert any(f" {w} " in text for w in world.INTENSIFIERS)
    assert any(f" {w} " in text for w in world.DAMPENERS)


def test_mood_decides_the_sentiment():
    happy = world.sample_reviews(100, seed=2, mood=0.9)
    unhappy = world.sample_reviews(100, seed=2, mood=-0.9)
    assert sum(sentiment(r.response) for r in happy) / 100 > 0.5
    assert sum(sentiment(r.response) for r in unhappy) / 100 < -0.5


def test_prompts_are_neutral_openings():
    prompts = world.sample_prompts(200, seed=3)
    assert sum(abs(sentiment(p)) < 0.3 for p in prompts) / len(prompts) > 0.85
