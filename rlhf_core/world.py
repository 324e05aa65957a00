"""The offline world: a seeded generator of short movie reviews.

The course needs a language task whose ground truth is known, small enough to learn on a laptop
CPU in minutes. This module is that task's "internet": a probabilistic grammar of movie reviews.

A review is a *prompt* (a neutral opening that names a made-up film, its director or star) and a
*response* (a continuation that judges the film, then usually closes with a verdict):

    prompt:   "I watched The Hollow Lantern last weekend."
    response: " The acting was really wonderful, but the ending was dull. Overall, a fine drama."

Each review is written with a hidden *mood* in [-1, 1], the reviewer's opinion. The mood decides
which sentiment words appear, how strong they are, whether they are intensified ("really"),
softened ("somewhat"), negated ("not bad") or contrasted ("..., but ..."). Every sentiment word
and modifier is one that VADER's lexicon knows (see ``rlhf_core.gold``), so the hidden human can
read what the grammar writes. Film titles and names are invented, so the BPE tokenizer has real
merges to learn and nothing here can be looked up.

The response text starts with a space (" The acting ..."), so ``prompt + response`` is the review.
The end of a review is marked by the tokenizer's EOS token, added when text is tokenized.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Sentiment adjectives with VADER valences (kept here so the grammar can weigh them; a test checks
# they equal VADER's own lexicon). Positive and negative words of varied strength.
ADJECTIVES: dict[str, float] = {
    "fine": 0.8,
    "solid": 0.6,
    "nice": 1.8,
    "good": 1.9,
    "enjoyable": 1.9,
    "clever": 2.0,
    "pleasant": 2.3,
    "strong": 2.3,
    "impressive": 2.3,
    "fantastic": 2.6,
    "wonderful": 2.7,
    "excellent": 2.7,
    "perfect": 2.7,
    "brilliant": 2.8,
    "lovely": 2.8,
    "charming": 2.8,
    "delightful": 2.8,
    "beautiful": 2.9,
    "superb": 3.1,
    "great": 3.1,
    "confusing": -0.9,
    "boring": -1.3,
    "messy": -1.5,
    "dull": -1.7,
    "annoying": -1.7,
    "lame": -1.8,
    "weak": -1.9,
    "painful": -1.9,
    "dreadful": -1.9,
    "awful": -2.0,
    "terrible": -2.1,
    "poor": -2.1,
    "disappointing": -2.2,
    "stupid": -2.4,
    "bad": -2.5,
    "horrible": -2.5,
}
# Verbs a reviewer uses about an aspect ("I loved the music.").
VERBS: dict[str, float] = {
    "liked": 1.8,
    "enjoyed": 2.3,
    "admired": 2.3,
    "loved": 2.9,
    "disliked": -1.7,
    "hated": -3.2,
}
INTENSIFIERS = ["really", "very", "truly", "incredibly", "absolutely", "extremely", "so", "quite"]
DAMPENERS = ["somewhat", "slightly", "kind of", "fairly", "rather"]

ASPECTS = [
    "acting",
    "plot",
    "story",
    "script",
    "dialogue",
    "music",
    "score",
    "soundtrack",
    "ending",
    "pacing",
    "cast",
    "direction",
    "camera work",
    "editing",
    "costume design",
    "set design",
    "first act",
    "final scene",
    "lead performance",
    "writing",
]
GENRES = [
    "drama",
    "musical",
    "western",
    "mystery",
    "detective story",
    "family film",
    "spy film",
    "science fiction film",
    "period piece",
    "road movie",
    "space opera",
    "courtroom drama",
]
TITLE_ADJECTIVES = [
    "Crimson",
    "Silent",
    "Hollow",
    "Golden",
    "Midnight",
    "Velvet",
    "Frozen",
    "Hidden",
    "Paper",
    "Iron",
    "Glass",
    "Distant",
    "Northern",
    "Scarlet",
    "Quiet",
    "Seventh",
    "Copper",
    "Amber",
    "Winter",
    "Salt",
]
TITLE_NOUNS = [
    "Harbor",
    "Orchard",
    "Lantern",
    "Garden",
    "Kingdom",
    "Letter",
    "River",
    "Mirror",
    "Machine",
    "Summer",
    "Station",
    "Tide",
    "Forest",
    "Engine",
    "Crown",
    "Voyage",
    "Lighthouse",
    "Carousel",
    "Meridian",
    "Archive",
]
INVENTED_TITLES = [
    "Zorvath",
    "Quellmoor",
    "Brindlemark",
    "Astravel",
    "Nimbrook",
    "Korrigan",
    "Vaskaloo",
    "Elderwyn",
    "Thessaly Road",
    "Orvando",
    "Pellucid",
    "Marrowgate",
]
FIRST_NAMES = [
    "Mara",
    "Tobias",
    "Ines",
    "Kofi",
    "Lena",
    "Rafael",
    "Yuki",
    "Soren",
    "Amara",
    "Dmitri",
    "Clara",
    "Idris",
    "Nell",
    "Mateo",
    "Freya",
    "Arjun",
    "Odile",
    "Bram",
]
SURNAMES = [
    "Velden",
    "Quennell",
    "Ashgrove",
    "Marlowe",
    "Thistlewood",
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Kestrel",
    "Danvers",
    "Halloway",
    "Brightwater",
    "Varga",
    "Castellan",
    "Nakashima",
    "Ferreira",
    "Osterhout",
    "Calloway",
]
CHARACTERS = [
    "a retired detective",
    "a young pilot",
    "a night nurse",
    "a travelling musician",
    "a sheep farmer",
    "a ship's captain",
    "a small-town mayor",
    "a chess teacher",
    "an old watchmaker",
    "a radio host",
    "a forger",
    "a lighthouse keeper",
    "a mountain guide",
    "a court stenographer",
]
TIMES = [
    "last night",
    "last weekend",
    "on Friday",
    "yesterday",
    "this week",
    "on a long flight",
    "at a film club",
    "with my family",
    "twice this month",
    "at the old cinema downtown",
]

PROMPT_TEMPLATES = [
    "I watched {title} {time}.",
    "{title} is a {genre} directed by {name}.",
    "My brother took me to see {title}.",
    "{title}, starring {name}, opened this year.",
    "I finally saw {title}, a {genre} about {character}.",
    "In {title}, {name} stars as {character}.",
    "I saw {title} {time}. It is a {genre}.",
    "{name} directed {title}, a {genre}.",
]


def with_article(phrase: str) -> str:
    """ "a" or "an" before a phrase, by its first letter: "an excellent", "a superb"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Review:
    prompt: str  # the neutral opening, e.g. "I watched The Quiet Harbor last night."
    response: str  # the continuation, starting with a space; EOS is added by the tokenizer
    mood: float  # the hidden opinion in [-1, 1] that chose the words

    @property
    def text(self) -> str:
        return self.prompt + self.response


class ReviewWorld:
    """A seeded review writer. Same seed, same reviews (``random.Random`` only, no global state)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    # ----- names and prompts --------------------------------------------------------------
    def title(self) -> str:
        rng = self.rng
        if rng.random() < 0.25:
            return rng.choice(INVENTED_TITLES)
        if rng.random() < 0.5:
            return f"The {rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"
        return f"{rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"

    def name(self) -> str:
        return f"{self.rng.choice(FIRST_NAMES)} {self.rng.choice(SURNAMES)}"

    def prompt(self) -> str:
        rng = self.rng
        template = rng.choice(PROMPT_TEMPLATES)
        return template.format(
            title=self.title(),
            time=rng.choice(TIMES),
            genre=rng.choice(GENRES),
            name=self.name(),
            character=rng.choice(CHARACTERS),
        )

    # ----- sentiment pieces ---------------------------------------------------------------
    def _weighted(self, table: dict[str, float], mood: float, sharpness: float = 4.0) -> str:
        """Pick a word; the stronger the mood, the more the choice leans to words of its sign."""
        words = list(table)
        weights = [math.exp(sharpness * mood * table[w] / 3.0) for w in words]
        return self.rng.choices(words, weights=weights, k=1)[0]

    def _modified(self, adjective: str, mood: float) -> str:
        """Optionally intensify ("really good") or soften ("somewhat dull") an adjective."""
        roll = self.rng.random()
        if roll < 0.15 + 0.25 * abs(mood):
            return f"{self.rng.choice(INTENSIFIERS)} {adjective}"
        if roll > 0.88:
            return f"{self.rng.choice(DAMPENERS)} {adjective}"
        return adjective

    def _opinion(self, mood: float, aspect: str | None = None) -> str:
        """One clause about an aspect whose sentiment follows the mood, e.g. "the music was great"."""
        rng = self.rng
        aspect = aspect or rng.choice(ASPECTS)
        roll = rng.random()
        if roll < 0.12:
            # Negation: "not" before a word of the opposite sign ("the plot was not bad").
            return f"the {aspect} was not {self._weighted(ADJECTIVES, -mood)}"
        if roll < 0.30:
            return f"I {self._weighted(VERBS, mood)} the {aspect}"
        return f"the {aspect} was {self._modified(self._weighted(ADJECTIVES, mood), mood)}"

    def _sentence(self, mood: float) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.18:
            # Contrast: VADER weighs the clause after "but" more, and so does a reader.
            first_aspect, second_aspect = rng.sample(ASPECTS, 2)
            first = self._opinion(-mood * rng.uniform(0.3, 1.0), first_aspect)
            return f"{first[0].upper()}{first[1:]}, but {self._opinion(mood, second_aspect)}."
        if roll < 0.30:
            adjective = self._modified(self._weighted(ADJECTIVES, mood), mood)
            return f"{self.name()} gives {with_article(adjective)} performance as {rng.choice(CHARACTERS)}."
        clause = self._opinion(mood)
        return f"{clause[0].upper()}{clause[1:]}."

    def _closing(self, mood: float) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            adjective = self._modified(self._weighted(ADJECTIVES, mood), mood)
            return f"Overall, {with_article(adjective)} {rng.choice(GENRES)}."
        if roll < 0.8:
            return "I would recommend it." if mood + rng.gauss(0, 0.3) > 0 else "I would not recommend it."
        return f"All in all, it was {self._modified(self._weighted(ADJECTIVES, mood), mood)}."

    # ----- responses and reviews ----------------------------------------------------------
    def response(self, mood: float, n_sentences: int | None = None, closing: bool | None = None) -> str:
        """A continuation of ``n_sentences`` opinions (random 1-4) and usually a closing verdict."""
        rng = self.rng
        if n_sentences is None:
            n_sentences = rng.choice([1, 2, 2, 3, 3, 4])
        if closing is None:
            closing = rng.random() < 0.8
        # Each sentence wobbles around the reviewer's mood: real reviews are not all one note.
        sentences = [self._sentence(max(-1.0, min(1.0, mood + rng.gauss(0, 0.35)))) for _ in range(n_sentences)]
        if closing:
            sentences.append(self._closing(mood))
        return " " + " ".join(sentences)

    def review(self, mood: float | None = None, n_sentences: int | None = None) -> Review:
        if mood is None:
            mood = self.rng.uniform(-1.0, 1.0)
        return Review(prompt=self.prompt(), response=self.response(mood, n_sentences), mood=mood)


def sample_reviews(n: int, seed: int, mood: float | None = None) -> list[Review]:
    """``n`` reviews with moods uniform in [-1, 1] (or all of the given mood)."""
    world = ReviewWorld(seed)
    return [world.review(mood) for _ in range(n)]


def sample_prompts(n: int, seed: int) -> list[str]:
    """``n`` review openings; different seeds give the train and the held-out evaluation prompts."""
    world = ReviewWorld(seed)
    return [world.prompt() for _ in range(n)]


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """Whole reviews (prompt + response) for pretraining the base model, moods uniform; a few
    long ones (6-8 sentences) so the base model has also seen reviewers who ramble."""
    world = ReviewWorld(seed)
    texts = []
    for _ in range(n):
        long = world.rng.random() < 0.08
        texts.append(world.review(n_sentences=world.rng.randint(6, 8) if long else None).text)
    return texts


# Seeds of the standard splits: every stage of the course uses the same held-out prompts.
TRAIN_PROMPT_SEED = 1_000
EVAL_PROMPT_SEED = 2_000
PRETRAIN_SEED = 3_000
PRETRAIN_VALIDATION_SEED = 4_000
