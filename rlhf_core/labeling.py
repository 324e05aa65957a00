"""Labelling preference pairs by hand: a session that holds the state, and a widget that shows it.

Chapter 01 lets the learner be the human in RLHF: read a prompt and two responses, click which is
better. Two pieces, kept apart on purpose:

- ``LabelingSession``: the state machine, plain Python, testable without a browser. It knows the
  pairs, the order each pair is *shown* in, every answer given, and turns the answers into
  preference records.
- ``LabelingWidget``: an ipywidgets view of a session. Its click handlers only call session
  methods and redraw; they never do slow work, so a click never freezes the notebook.

``scripted_labels`` drives a session from a function instead of clicks (tests, CI, and a notebook
run unattended), and ``simulated_chooser`` is such a function: a simulated person from
``rlhf_core.gold`` who judges the shown texts.

**Position bias.** People tend to favour the first (or the left) option. If the response a pair
lists first were always shown as "A", that habit would leak into the labels. Each pair's display
order is therefore drawn from a seeded RNG, balanced so that half the pairs show their first
response as A and half as B (in a random arrangement), and the record written uses the response
*texts*, never the letters.

**What is written.** Each "A better" or "B better" answer becomes one record in the preference
format of ``rlhf_core.preferences``::

    {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold",
     "chosen_ended", "rejected_ended", "source": "human"}

written with ``save_preferences`` and read back with ``load_preferences`` (a scripted run writes
``"source": "simulated"``: the labels came from a simulated person, not from the learner).

"tie" and "skip" answers are kept in the session (``judgements``, ``counts()``) but are *not*
written: a Bradley-Terry reward model learns from "this one is better than that one", and a tie
or a skip says neither. (Some labs keep ties as half-weighted pairs; this course does not.)

The gold scores travel with each pair only for the analysis afterwards (how often the learner
agreed with the hidden human); they are never shown in the widget.
"""

from __future__ import annotations

import html
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .gold import PreferenceLabeler, gold_score
from .preferences import SOURCES, save_preferences

# The answers a session accepts: the learner prefers the response shown as A, or as B, finds them
# equally good ("tie"), or does not want to judge this pair ("skip").
ANSWERS = ("A", "B", "tie", "skip")
# Labels of the widget's buttons, by answer.
BUTTON_LABELS = {"A": "A better", "B": "B better", "tie": "tie", "skip": "skip"}


class LabelingStateError(RuntimeError):
    """An action the session cannot take in its current state (answering after the last pair,
    undoing before the first answer)."""


@dataclass(frozen=True)
class PairToLabel:
    """Two responses to one prompt, in the order the pair was built (not the order shown)."""

    prompt: str  # the review opening both responses continue
    first: str  # one response
    second: str  # the other response
    first_gold: float  # the hidden human's score of ``first``: for the analysis only, never shown
    second_gold: float  # the hidden human's score of ``second``
    first_ended: bool = True  # ``first`` stopped with EOS (False: cut at the length limit)
    second_ended: bool = True  # ``second`` stopped with EOS

    def __post_init__(self):
        if not self.first.strip() or not self.second.strip():
            raise ValueError(f"both responses of a pair must be non-empty (prompt {self.prompt!r})")
        if self.first == self.second:
            raise ValueError(f"the two responses of a pair are the same text, nothing to prefer: {self.first!r}")

    @classmethod
    def from_record(cls, record: Mapping) -> PairToLabel:
        """A pair from a mapping with keys prompt/first/second/first_gold/second_gold, or from a
        preference record (prompt/chosen/rejected/chosen_gold/rejected_gold): relabelling a
        preference file by hand is allowed, and the display order is randomised all the same."""
        if "first" in record:
            keys = ("prompt", "first", "second", "first_gold", "second_gold")
            flags = ("first_ended", "second_ended")
        else:
            keys = ("prompt", "chosen", "rejected", "chosen_gold", "rejected_gold")
            flags = ("chosen_ended", "rejected_ended")
        missing = [key for key in keys if key not in record]
        if missing:
            raise ValueError(f"a pair to label needs the keys {keys}; missing {missing} in {dict(record)!r}")
        prompt, first, second, first_gold, second_gold = (record[key] for key in keys)
        return cls(
            prompt=str(prompt),
            first=str(first),
            second=str(second),
            first_gold=float(first_gold),
            second_gold=float(second_gold),
            first_ended=bool(record.get(flags[0], True)),
            second_ended=bool(record.get(flags[1], True)),
        )


class ShownPair(NamedTuple):
    """What the learner sees for one pair: the prompt and the two responses in display order."""

    prompt: str
    response_a: str
    response_b: str


@dataclass(frozen=True)
class Judgement:
    """One answer given in a session."""

    pair_index: int  # which pair of ``session.pairs`` was judged
    answer: str  # "A", "B", "tie" or "skip", as given
    swapped: bool  # True when A showed the pair's ``second`` response (and B its ``first``)

    @property
    def preferred(self) -> str | None:
        """ "first" or "second" (in the pair's own order) for an A/B answer; None for tie and skip."""
        if self.answer not in ("A", "B"):
            return None
        a_is_first = not self.swapped
        return "first" if (self.answer == "A") == a_is_first else "second"


def _normalised_answer(answer: object) -> str:
    """Accept "A", "b", " Tie " ...; anything else is a ValueError naming the valid answers."""
    if isinstance(answer, str):
        cleaned = answer.strip()
        for valid in ANSWERS:
            if cleaned.lower() == valid.lower():
                return valid
    raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")


def balanced_display_orders(n_pairs: int, seed: int) -> list[bool]:
    """For each pair, whether it is shown swapped (its second response as A).

    Exactly half the pairs are swapped (one more or less for an odd count, by coin flip), in an
    order shuffled by ``random.Random(seed)``: position bias cannot line up with the pair order,
    and both orders occur whenever there are two pairs or more.
    """
    rng = random.Random(seed)
    swapped = [index % 2 == 1 for index in range(n_pairs)]
    if n_pairs % 2 == 1 and rng.random() < 0.5:
        swapped[-1] = True  # the odd pair out is swapped half of the time
    rng.shuffle(swapped)
    return swapped


class LabelingSession:
    """The state of one labelling session: pairs, display orders, answers so far.

    ``pairs`` are ``PairToLabel`` objects or mappings ``PairToLabel.from_record`` reads. ``seed``
    fixes the display orders. With ``out_path``, the chosen/rejected records are rewritten to that
    file after every answer and undo (a few lines of JSON: cheap enough for a click handler), so a
    learner's work survives a closed browser tab.
    """

    def __init__(
        self,
        pairs: Sequence[PairToLabel | Mapping],
        seed: int = 0,
        out_path: str | Path | None = None,
        source: str = "human",
    ):
        self.pairs: list[PairToLabel] = [
            pair if isinstance(pair, PairToLabel) else PairToLabel.from_record(pair) for pair in pairs
        ]
        if not self.pairs:
            raise ValueError("a labelling session needs at least one pair")
        self.seed = seed
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.source = source  # written into every record: "human", or "simulated" for a scripted run
        self.out_path = Path(out_path) if out_path is not None else None
        self.swapped: list[bool] = balanced_display_orders(len(self.pairs), seed)
        self.judgements: list[Judgement] = []  # every answer, ties and skips included, in order

    # ----- where the session stands ---------------------------------------------------------
    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def n_answered(self) -> int:
        """Pairs answered so far (ties and skips count: they move the session on)."""
        return len(self.judgements)

    @property
    def done(self) -> bool:
        return self.n_answered == self.n_pairs

    @property
    def progress(self) -> tuple[int, int]:
        """(answered, total)."""
        return self.n_answered, self.n_pairs

    def progress_text(self) -> str:
        """ "3 / 10 labelled", the line the widget shows."""
        return f"{self.n_answered} / {self.n_pairs} labelled"

    def current(self) -> ShownPair | None:
        """The pair to judge now, in display order; None once every pair is answered."""
        if self.done:
            return None
        index = self.n_answered
        pair = self.pairs[index]
        if self.swapped[index]:
            return ShownPair(pair.prompt, pair.second, pair.first)
        return ShownPair(pair.prompt, pair.first, pair.second)

    # ----- changing it ----------------------------------------------------------------------
    def answer(self, answer: str) -> Judgement:
        """Record an answer ("A", "B", "tie" or "skip") for the current pair and move on."""
        normalised = _normalised_answer(answer)  # ValueError before any state changes
        if self.done:
            raise LabelingStateError(
                f"all {self.n_pairs} pairs are already labelled; undo() to change the last answer, "
                f"or start a new LabelingSession"
            )
        index = self.n_answered
        judgement = Judgement(pair_index=index, answer=normalised, swapped=self.swapped[index])
        self.judgements.append(judgement)
        self._autosave()
        return judgement

    def undo(self) -> Judgement:
        """Take back the last answer; that pair becomes current again (shown in the same order)."""
        if not self.judgements:
            raise LabelingStateError("nothing to undo: no pair has been answered yet")
        judgement = self.judgements.pop()
        self._autosave()
        return judgement

    # ----- what the answers say -------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """How many of each answer were given so far (every answer listed, zeros included)."""
        counted = Counter(judgement.answer for judgement in self.judgements)
        return {answer: counted.get(answer, 0) for answer in ANSWERS}

    def decided(self) -> list[Judgement]:
        """The A/B answers: those that become preference records."""
        return [judgement for judgement in self.judgements if judgement.preferred is not None]

    def records(self) -> list[dict]:
        """The chosen/rejected records of the A/B answers so far (ties and skips are left out)."""
        records = []
        for judgement in self.decided():
            pair = self.pairs[judgement.pair_index]
            first = (pair.first, pair.first_gold, pair.first_ended)
            second = (pair.second, pair.second_gold, pair.second_ended)
            (chosen, chosen_gold, chosen_ended), (rejected, rejected_gold, rejected_ended) = (
                (first, second) if judgement.preferred == "first" else (second, first)
            )
            records.append(
                {
                    "prompt": pair.prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_gold": chosen_gold,
                    "rejected_gold": rejected_gold,
                    "chosen_ended": chosen_ended,
                    "rejected_ended": rejected_ended,
                    "source": self.source,
                }
            )
        return records

    def agreement_with_gold(self) -> float | None:
        """Fraction of the A/B answers whose chosen response has the higher gold score.

        Pairs whose two gold scores are exactly equal have no gold order and are left out. None
        when no A/B answer with a gold order was given yet (there is nothing to measure).
        """
        records = [record for record in self.records() if record["chosen_gold"] != record["rejected_gold"]]
        if not records:
            return None
        return sum(record["chosen_gold"] > record["rejected_gold"] for record in records) / len(records)

    def share_of_a(self) -> float | None:
        """Fraction of the A/B answers that were "A": near 0.5 unless the labeller favours a side.

        Because display orders are randomised, a side preference adds noise but no systematic
        bias to the records. None before any A/B answer.
        """
        decided = self.decided()
        if not decided:
            return None
        return sum(judgement.answer == "A" for judgement in decided) / len(decided)

    def save(self, path: str | Path | None = None) -> Path:
        """Write the chosen/rejected records (JSON lines, the preference format) to ``path``, or
        to the session's ``out_path``; returns the path written."""
        target = Path(path) if path is not None else self.out_path
        if target is None:
            raise ValueError("save() needs a path: pass one, or create the session with out_path=...")
        return save_preferences(target, self.records())

    def _autosave(self) -> None:
        if self.out_path is not None:
            self.save(self.out_path)


# ----- driving a session without a browser ----------------------------------------------------

Chooser = Callable[[str, str, str], str]  # (prompt, response_a, response_b) -> an answer in ANSWERS


def scripted_labels(session: LabelingSession, chooser: Chooser, max_answers: int | None = None) -> LabelingSession:
    """Answer the session's remaining pairs (at most ``max_answers``) with ``chooser``, which sees
    exactly what the learner sees: the prompt and the two responses in display order."""
    answered = 0
    while not session.done and (max_answers is None or answered < max_answers):
        shown = session.current()
        session.answer(chooser(shown.prompt, shown.response_a, shown.response_b))
        answered += 1
    return session


def simulated_chooser(labeler: PreferenceLabeler | None = None, tie_margin: float = 0.0) -> Chooser:
    """A simulated person for ``scripted_labels``: reads both texts, scores them with the gold
    (assuming both responses ended with EOS, as world reviews do) and answers through the
    labeler's Bradley-Terry noise. Gold gaps below ``tie_margin`` are answered "tie"."""
    labeler = labeler or PreferenceLabeler()

    def choose(prompt: str, response_a: str, response_b: str) -> str:
        gold_a, gold_b = gold_score(prompt, response_a), gold_score(prompt, response_b)
        if abs(gold_a - gold_b) < tie_margin:
            return "tie"
        return "A" if labeler.prefers_first(gold_a, gold_b) else "B"

    return choose


# ----- the widget -----------------------------------------------------------------------------


def _response_html(letter: str, text: str) -> str:
    return (
        f"<div style='border:1px solid #bbb;border-radius:6px;padding:8px;min-height:4em'>"
        f"<b>{letter}</b><br>{html.escape(text.strip())}</div>"
    )


class LabelingWidget:
    """An ipywidgets view of a ``LabelingSession``: the prompt, responses A and B side by side,
    the buttons "A better", "B better", "tie", "skip" and "undo", and the progress line.

    Display it as the last expression of a cell (or with ``IPython.display.display``). The
    buttons work without a browser too: ``widget.buttons["A"].click()`` runs the same handler.
    """

    def __init__(self, session: LabelingSession):
        import ipywidgets as widgets

        self.session = session
        self.progress = widgets.HTML()
        self.prompt = widgets.HTML()
        self.response_a = widgets.HTML(layout=widgets.Layout(width="50%"))
        self.response_b = widgets.HTML(layout=widgets.Layout(width="50%"))
        self.message = widgets.HTML()  # errors and the closing note appear here
        self.buttons: dict[str, widgets.Button] = {}
        for answer in ANSWERS:
            button = widgets.Button(
                description=BUTTON_LABELS[answer], button_style="primary" if answer in ("A", "B") else ""
            )
            button.on_click(self._answer_handler(answer))
            self.buttons[answer] = button
        self.buttons["undo"] = widgets.Button(description="undo", button_style="warning")
        self.buttons["undo"].on_click(self._on_undo)
        self.view = widgets.VBox(
            [
                self.progress,
                self.prompt,
                widgets.HBox([self.response_a, self.response_b]),
                widgets.HBox([self.buttons[name] for name in (*ANSWERS, "undo")]),
                self.message,
            ]
        )
        self.refresh()

    # Handlers: record through the session, then redraw. Nothing slow happens here.
    def _answer_handler(self, answer: str) -> Callable:
        def on_click(_button) -> None:
            self._act(lambda: self.session.answer(answer))

        return on_click

    def _on_undo(self, _button) -> None:
        self._act(self.session.undo)

    def _act(self, action: Callable[[], object]) -> None:
        # An exception inside a widget callback goes to a log the learner never sees, so a refused
        # action is shown in the widget instead.
        try:
            action()
        except (LabelingStateError, ValueError) as error:
            self.refresh()
            self.message.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
            return
        self.refresh()

    def refresh(self) -> None:
        """Redraw everything from the session's state."""
        session = self.session
        self.progress.value = f"<b>{session.progress_text()}</b>"
        shown = session.current()
        if shown is None:
            self.prompt.value = "<i>All pairs are labelled.</i>"
            self.response_a.value = self.response_b.value = ""
            saved = f" Saved to <code>{html.escape(str(session.out_path))}</code>." if session.out_path else ""
            self.message.value = f"Done: {len(session.records())} preference pairs recorded.{saved} Run the next cell."
        else:
            self.prompt.value = f"<b>Prompt:</b> {html.escape(shown.prompt)}"
            self.response_a.value = _response_html("A", shown.response_a)
            self.response_b.value = _response_html("B", shown.response_b)
            self.message.value = ""
        for answer in ANSWERS:
            self.buttons[answer].disabled = session.done
        self.buttons["undo"].disabled = session.n_answered == 0

    def _repr_mimebundle_(self, **kwargs):
        return self.view._repr_mimebundle_(**kwargs)
