"""The labelling session (state machine) and its widget, driven by scripted answers and clicks."""

import html
import json

import pytest

from rlhf_core.gold import PreferenceLabeler, gold_score
from rlhf_core.labeling import (
    ANSWERS,
    LabelingSession,
    LabelingStateError,
    LabelingWidget,
    PairToLabel,
    balanced_display_orders,
    scripted_labels,
    simulated_chooser,
)
from rlhf_core.preferences import load_preferences
from rlhf_core.world import ReviewWorld


def make_pairs(n: int, seed: int = 0) -> list[PairToLabel]:
    """World pairs: a glowing response first, a harsh one second, so the gold order is known."""
    world = ReviewWorld(seed)
    pairs = []
    for _ in range(n):
        prompt = world.prompt()
        good, bad = world.response(0.9, n_sentences=2, closing=True), world.response(-0.9, n_sentences=2, closing=True)
        pairs.append(PairToLabel(prompt, good, bad, gold_score(prompt, good), gold_score(prompt, bad)))
    return pairs


def pick_first_of_pair(session: LabelingSession):
    """A chooser that always picks the response the pair lists first, wherever it is shown."""

    def choose(prompt, response_a, response_b):
        pair = session.pairs[session.n_answered]
        assert pair.prompt == prompt
        return "A" if response_a == pair.first else "B"

    return choose


def test_display_order_is_seeded_balanced_and_both_orders_occur():
    pairs = make_pairs(10)
    orders = LabelingSession(pairs, seed=3).swapped
    assert orders == LabelingSession(pairs, seed=3).swapped  # same seed, same orders
    assert sum(orders) == 5  # exactly half shown swapped
    assert any(LabelingSession(pairs, seed=seed).swapped != orders for seed in range(4, 10))
    for n in (2, 3, 7):
        assert 0 < sum(balanced_display_orders(n, seed=1)) < n  # both orders occur
    # what is shown follows the order: A is the first response exactly when the pair is not swapped
    session = LabelingSession(pairs, seed=3)
    for index, pair in enumerate(pairs):
        shown = session.current()
        assert shown.prompt == pair.prompt
        assert (shown.response_a, shown.response_b) == (
            (pair.second, pair.first) if orders[index] else (pair.first, pair.second)
        )
        session.answer("skip")


def test_answer_b_on_a_swapped_pair_chooses_the_first_response():
    pairs = make_pairs(4)
    session = LabelingSession(pairs, seed=0)
    for index, pair in enumerate(pairs):
        shown = session.current()
        if session.swapped[index]:
            assert shown.response_a == pair.second  # A shows the pair's second response ...
            session.answer("A")  # ... so "A better" must choose the second
            expected = (pair.second, pair.first, pair.second_gold, pair.first_gold)
        else:
            session.answer("A")
            expected = (pair.first, pair.second, pair.first_gold, pair.second_gold)
        record = session.records()[-1]
        assert (record["chosen"], record["rejected"], record["chosen_gold"], record["rejected_gold"]) == expected
        assert record["prompt"] == pair.prompt and record["source"] == "human"
    assert {True, False} == set(session.swapped)  # both cases were exercised


def test_records_and_gold_agreement_do_not_depend_on_the_display_order():
    pairs = make_pairs(12)
    for seed in range(3):
        session = LabelingSession(pairs, seed=seed)
        scripted_labels(session, pick_first_of_pair(session))
        assert [r["chosen"] for r in session.records()] == [p.first for p in pairs]
        assert session.agreement_with_gold() == 1.0  # the first response is always the glowing one
        assert 0 < session.share_of_a() < 1  # picking by content, not by side, uses both letters


def test_ties_and_skips_are_counted_but_not_written(tmp_path):
    pairs = make_pairs(5)
    session = LabelingSession(pairs, seed=1)
    for answer in ("A", "tie", "skip", "b", " TIE "):  # case and spaces are forgiven
        session.answer(answer)
    assert session.done and session.progress == (5, 5)
    assert session.counts() == {"A": 1, "B": 1, "tie": 2, "skip": 1}
    assert len(session.records()) == 2
    assert [j.pair_index for j in session.decided()] == [0, 3]
    path = session.save(tmp_path / "mine.jsonl")
    assert len(path.read_text().splitlines()) == 2


def test_progress_done_and_errors():
    session = LabelingSession(make_pairs(3), seed=0)
    assert session.progress == (0, 3) and session.progress_text() == "0 / 3 labelled" and not session.done
    assert session.agreement_with_gold() is None and session.share_of_a() is None
    with pytest.raises(LabelingStateError, match="nothing to undo"):
        session.undo()
    for bad in ("C", "", "A better", None, 1):
        with pytest.raises(ValueError, match="answer must be one of"):
            session.answer(bad)
    assert session.progress == (0, 3)  # a refused answer changes nothing
    session.answer("A")
    assert session.progress_text() == "1 / 3 labelled"
    session.answer("B")
    session.answer("skip")
    assert session.done and session.current() is None and session.progress_text() == "3 / 3 labelled"
    with pytest.raises(LabelingStateError, match="already labelled"):
        session.answer("A")
    with pytest.raises(ValueError):  # an invalid answer is a ValueError even when done
        session.answer("maybe")
    assert session.progress == (3, 3)


def test_undo_returns_to_the_same_pair_shown_the_same_way():
    pairs = make_pairs(3)
    session = LabelingSession(pairs, seed=2)
    shown = session.current()
    session.answer("A")
    undone = session.undo()
    assert undone.answer == "A" and undone.pair_index == 0
    assert session.current() == shown and session.records() == [] and session.progress == (0, 3)
    for _ in range(3):
        session.answer("B")
    session.undo()
    assert not session.done and session.current().prompt == pairs[2].prompt
    session.answer("tie")
    assert session.done and len(session.records()) == 2


def test_invalid_pairs_and_sources_are_refused():
    with pytest.raises(ValueError, match="at least one pair"):
        LabelingSession([], seed=0)
    with pytest.raises(ValueError, match="same text"):
        PairToLabel("p", " same.", " same.", 0.1, 0.2)
    with pytest.raises(ValueError, match="non-empty"):
        PairToLabel("p", " ", " fine.", 0.1, 0.2)
    with pytest.raises(ValueError, match="missing"):
        LabelingSession([{"prompt": "p", "first": " a."}])
    with pytest.raises(ValueError, match="source"):
        LabelingSession(make_pairs(1), source="robot")


def test_pairs_from_mappings_and_preference_records():
    pair = make_pairs(1)[0]
    from_keys = PairToLabel.from_record(
        {
            "prompt": pair.prompt,
            "first": pair.first,
            "second": pair.second,
            "first_gold": pair.first_gold,
            "second_gold": pair.second_gold,
        }
    )
    from_preference = PairToLabel.from_record(
        {
            "prompt": pair.prompt,
            "chosen": pair.first,
            "rejected": pair.second,
            "chosen_gold": pair.first_gold,
            "rejected_gold": pair.second_gold,
            "rejected_ended": False,
            "source": "simulated",
        }
    )
    assert from_keys == pair
    assert from_preference.second_ended is False and from_preference.first == pair.first


def test_written_file_loads_with_load_preferences(tmp_path):
    pairs = make_pairs(6)
    pairs[0] = PairToLabel(
        pairs[0].prompt, pairs[0].first, " The plot was", pairs[0].first_gold, -0.5, second_ended=False
    )
    out = tmp_path / "labels" / "human.jsonl"
    session = LabelingSession(pairs, seed=4, out_path=out)
    scripted_labels(session, pick_first_of_pair(session), max_answers=1)
    assert len(load_preferences(out)) == 1  # written after every answer
    scripted_labels(session, pick_first_of_pair(session))
    loaded = load_preferences(out)
    assert loaded == session.records() and len(loaded) == 6
    assert all(record["source"] == "human" for record in loaded)
    assert loaded[0]["rejected_ended"] is False
    session.undo()
    assert len(load_preferences(out)) == 5  # undo rewrites the file too
    json.loads(out.read_text().splitlines()[0])  # plain JSON lines


def test_scripted_labels_with_a_simulated_person():
    pairs = make_pairs(20, seed=5)
    session = LabelingSession(pairs, seed=0, source="simulated")
    scripted_labels(session, simulated_chooser(PreferenceLabeler(temperature=0.25, seed=0)), max_answers=7)
    assert session.progress == (7, 20)
    scripted_labels(session, simulated_chooser(PreferenceLabeler(temperature=0.25, seed=0)))
    assert session.done
    # glowing vs harsh reviews: the gold gaps are large, so the simulated person agrees with gold
    assert session.agreement_with_gold() >= 0.9
    ties = LabelingSession(pairs, seed=0)
    scripted_labels(ties, simulated_chooser(tie_margin=10.0))  # every gap is "too small": all ties
    assert ties.counts()["tie"] == 20 and ties.records() == [] and ties.agreement_with_gold() is None


def test_widget_buttons_drive_the_session(tmp_path):
    pairs = make_pairs(4)
    session = LabelingSession(pairs, seed=0, out_path=tmp_path / "clicked.jsonl")
    widget = LabelingWidget(session)
    assert set(widget.buttons) == {*ANSWERS, "undo"}
    assert widget.buttons["A"].description == "A better" and widget.buttons["undo"].disabled
    assert "0 / 4 labelled" in widget.progress.value
    first_shown = session.current()
    assert html.escape(first_shown.prompt) in widget.prompt.value
    assert html.escape(first_shown.response_a.strip()) in widget.response_a.value
    assert html.escape(first_shown.response_b.strip()) in widget.response_b.value

    widget.buttons["B"].click()
    assert session.judgements[-1].answer == "B" and "1 / 4 labelled" in widget.progress.value
    assert not widget.buttons["undo"].disabled
    widget.buttons["undo"].click()
    assert session.progress == (0, 4) and session.current() == first_shown
    for name in ("A", "tie", "skip", "B"):
        widget.buttons[name].click()
    assert session.done and [j.answer for j in session.judgements] == ["A", "tie", "skip", "B"]
    assert all(widget.buttons[name].disabled for name in ANSWERS)
    assert "4 / 4 labelled" in widget.progress.value and "Done: 2 preference pairs" in widget.message.value
    assert len(load_preferences(tmp_path / "clicked.jsonl")) == 2

    # a click the session refuses (answering when done) is shown in the widget, not raised
    widget._answer_handler("A")(widget.buttons["A"])
    assert "already labelled" in widget.message.value and session.progress == (4, 4)
    assert "application/vnd.jupyter.widget-view+json" in widget._repr_mimebundle_()
