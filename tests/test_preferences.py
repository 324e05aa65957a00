"""Preference files: round trip, every kind of bad record named by file and line; simulated labels
follow the labeler's noise; the split keeps each prompt on one side."""

import json

import numpy as np
import pytest

from rlhf_core import world
from rlhf_core.gold import PreferenceLabeler, gold_score, sigmoid
from rlhf_core.models import load_causal_lm
from rlhf_core.preferences import (
    Candidates,
    PreferenceConfig,
    PreferenceFileError,
    build_preferences,
    gold_agreement,
    label_candidates,
    labeler_accuracy_cap,
    load_preferences,
    preferences_dataset,
    sample_candidates,
    save_preferences,
    split_preferences,
)

GOOD = {
    "prompt": "I saw Iron Harbor.",
    "chosen": " A superb film.",
    "rejected": " A dull film.",
    "chosen_gold": 0.6,
    "rejected_gold": -0.4,
    "chosen_ended": True,
    "rejected_ended": False,
    "source": "simulated",
}


def test_round_trip_keeps_every_field(tmp_path):
    records = [
        GOOD,
        {"prompt": "Salt Tide, a western.", "chosen": " Lovely — très bien.", "rejected": " Bad.", "source": "human"},
    ]
    path = save_preferences(tmp_path / "prefs.jsonl", records)
    assert load_preferences(path) == records
    assert preferences_dataset(records).num_rows == 2


def test_blank_lines_are_skipped_and_lines_still_count(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD) + "\n" + '{"prompt": 1}\n')
    with pytest.raises(PreferenceFileError, match=r"prefs\.jsonl, line 5\b"):
        load_preferences(path)
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n\n")
    assert len(load_preferences(path)) == 2
    path.write_text("")
    assert load_preferences(path) == []


BAD_RECORDS = [
    ('{"prompt": "x", "chosen": "a", ', "not valid JSON"),
    ('["x", "a", "b"]', "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    (json.dumps({"prompt": "x", "chosen": "a"}), "missing field 'rejected'"),
    (json.dumps({"chosen": "a", "rejected": "b"}), "missing field 'prompt'"),
    (json.dumps({"prompt": "x", "chosen": 3, "rejected": "b"}), "'chosen' must be a string, got int"),
    (json.dumps({"prompt": "x", "chosen": "a", "rejected": None}), "'rejected' must be a string, got NoneType"),
    (json.dumps({"prompt": "x", "chosen": "   ", "rejected": "b"}), "'chosen' is empty"),
    (json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}), "'prompt' is empty"),
    (json.dumps({"prompt": "x", "chosen": " same", "rejected": " same"}), "same text"),
    (json.dumps({**GOOD, "chosen_gold": "high"}), "'chosen_gold' must be a finite number"),
    (json.dumps({**GOOD, "rejected_gold": True}), "'rejected_gold' must be a finite number"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "chosen_gold": NaN}', "finite number"),
    (json.dumps({**GOOD, "chosen_ended": "yes"}), "'chosen_ended' must be true or false"),
    (json.dumps({**GOOD, "source": "robot"}), "'source' must be one of"),
]


@pytest.mark.parametrize("bad_line, message", BAD_RECORDS)
def test_bad_record_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "labels.jsonl"
    # Two good records, then the bad one on line 3: the error must say line 3 of this file.
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + bad_line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(PreferenceFileError) as error:
        load_preferences(path)
    assert isinstance(error.value, ValueError)
    assert f"{path}, line 3:" in str(error.value)
    assert message in str(error.value)


def test_saving_a_bad_record_fails_before_writing(tmp_path):
    path = tmp_path / "prefs.jsonl"
    save_preferences(path, [GOOD])
    with pytest.raises(PreferenceFileError, match="record 1"):
        save_preferences(path, [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    assert load_preferences(path) == [GOOD]  # the old file is intact


def test_split_keeps_every_prompt_on_one_side():
    records = [{"prompt": f"p{i % 50}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(200)]
    train, held_out = split_preferences(records, heldout_fraction=0.2, seed=3)
    assert len(train) + len(held_out) == 200
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held_out})
    assert len({r["prompt"] for r in held_out}) == 10
    assert split_preferences(records, 0.2, seed=3) == (train, held_out)  # seeded


def test_labeler_cap_is_the_mean_bradley_terry_probability():
    records = [{"chosen_gold": 0.5, "rejected_gold": 0.0}, {"chosen_gold": -1.0, "rejected_gold": 0.0}]
    assert labeler_accuracy_cap(records, 0.25) == pytest.approx((sigmoid(2.0) + sigmoid(4.0)) / 2)
    assert gold_agreement(records) == 0.5


@pytest.fixture(scope="module")
def base_model(tiny_profile):
    return load_causal_lm(tiny_profile.base_model)


def test_built_pairs_follow_the_labelers_noise(base_model, tokenizer):
    """The shipped base model writes reviews of every mood; the simulated labels must agree with
    the gold order as often as the Bradley-Terry labeler predicts, and a noisier labeler less."""
    prompts = world.sample_prompts(120, seed=11)
    config = PreferenceConfig(n_prompts=120, max_new_tokens=40, labeler_temperature=0.3)
    candidates = sample_candidates(base_model, tokenizer, prompts, config, seed=0)
    assert candidates.golds[0][1] == gold_score(prompts[0], candidates.responses[0][1], candidates.ended[0][1])
    records = label_candidates(candidates, PreferenceLabeler(temperature=0.3, seed=1))
    # build_preferences is exactly these two steps (sampling seed 0, labeler seed 1)
    small = PreferenceConfig(n_prompts=8, max_new_tokens=16, labeler_temperature=0.3)
    assert build_preferences(base_model, tokenizer, prompts[:8], small, seed=0) == label_candidates(
        sample_candidates(base_model, tokenizer, prompts[:8], small, seed=0), PreferenceLabeler(0.3, seed=1)
    )
    assert len(records) >= 110  # two samples are rarely the same text
    for record in records:
        assert record["chosen"] != record["rejected"] and record["source"] == "simulated"
        assert record["prompt"] in prompts
    # Expected agreement under the labeler's model (over pairs without a gold tie), and its spread.
    untied = [r for r in records if r["chosen_gold"] != r["rejected_gold"]]
    assert len(untied) >= 100
    expected = labeler_accuracy_cap(untied, 0.3)
    spread = np.sqrt(expected * (1 - expected) / len(untied))
    assert abs(gold_agreement(records) - expected) < 4 * spread
    assert expected < 0.97  # the noise is real: some labels go against the gold

    # The same responses judged by a very noisy labeler: labels near coin flips.
    noisy = label_candidates(candidates, PreferenceLabeler(temperature=50.0, seed=1))
    assert abs(gold_agreement(noisy) - 0.5) < 0.15
    # And by a noise-free one: always the gold order.
    exact = label_candidates(candidates, PreferenceLabeler(temperature=1e-6, seed=1))
    assert gold_agreement(exact) == 1.0


def test_three_responses_give_three_pairs_and_identical_ones_are_skipped():
    candidates = Candidates(
        prompts=["p1", "p2"],
        responses=[[" a", " b", " c"], [" same", " same", " "]],
        ended=[[True, True, False], [True, True, True]],
        golds=[[0.1, 0.5, -0.2], [0.3, 0.3, -1.0]],
    )
    records = label_candidates(candidates, PreferenceLabeler(temperature=1e-6, seed=0))
    assert [(r["chosen"], r["rejected"]) for r in records] == [(" b", " a"), (" a", " c"), (" b", " c")]
    assert records[1]["rejected_ended"] is False and records[1]["chosen_ended"] is True
