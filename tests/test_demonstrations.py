"""Demonstrations: seeded, scored by the gold, uneven on purpose, and saved as JSON lines."""

import numpy as np
import pytest

from rlhf_core.demonstrations import (
    DemonstratorConfig,
    demonstrator_leanings,
    load_demonstrations,
    mean_gold,
    save_demonstrations,
    write_demonstrations,
)
from rlhf_core.gold import gold_score
from rlhf_core.prompts import load_prompts


@pytest.fixture(scope="module")
def prompts(tiny_profile):
    return load_prompts(tiny_profile, "train", 400)


def test_same_seed_same_demonstrations(prompts):
    first = write_demonstrations(prompts, DemonstratorConfig(), seed=3)
    assert first == write_demonstrations(prompts, DemonstratorConfig(), seed=3)
    assert first != write_demonstrations(prompts, DemonstratorConfig(), seed=4)
    assert [r["prompt"] for r in first] == prompts
    assert set(first[0]) == {"prompt", "response", "gold", "demonstrator", "mood"}


def test_records_carry_their_gold_and_the_pool_is_uneven(prompts):
    records = write_demonstrations(prompts, DemonstratorConfig(), seed=0)
    for record in records[:50]:
        assert record["response"].startswith(" ")
        assert record["gold"] == pytest.approx(gold_score(record["prompt"], record["response"]), abs=1e-6)
    golds = np.array([r["gold"] for r in records])
    assert 0.2 < golds.mean() < 0.6  # above a random-mood writer, well below the ~0.85 of the best reviews
    assert golds.std() > 0.3  # uneven
    n_words = np.array([len(r["response"].split()) for r in records])
    assert (n_words > 40).mean() > 0.05  # some ramble past the reader's patience
    assert sum(not r["response"].rstrip().endswith((".", "!", "?")) for r in records) > 5  # some are unfinished
    assert len({r["demonstrator"] for r in records}) == DemonstratorConfig().n_demonstrators
    assert min(r["mood"] for r in records) < 0 < max(r["mood"] for r in records)


def test_leanings_are_centred_on_the_pool_mood():
    config = DemonstratorConfig()
    leanings = demonstrator_leanings(config)
    assert len(leanings) == config.n_demonstrators and leanings == sorted(leanings)
    assert np.mean(leanings) == pytest.approx(config.mood_mean, abs=1e-6)


def test_jsonl_round_trip(tmp_path, prompts):
    records = write_demonstrations(prompts[:64], seed=1)
    path = save_demonstrations(tmp_path / "sub" / "demos.jsonl", records)
    assert len(path.read_text().splitlines()) == 64
    dataset = load_demonstrations(path)
    assert dataset.num_rows == 64 and set(dataset.column_names) == set(records[0])
    assert [dict(row) for row in dataset] == records
    assert mean_gold(dataset) == pytest.approx(mean_gold(records))
