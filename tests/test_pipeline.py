"""``python -m rlhf_core run``: the whole pipeline on the tiny profile, its claims, its cache, ``--fresh``.

The module's first test runs the real tiny pipeline once, in the shared cache folder (``cache/``):
what it builds (SFT, reward model, PPO, DPO) is what the notebooks load afterwards.
"""

import json
import math
import time

import pytest

from rlhf_core.__main__ import main
from rlhf_core.best_of_n import analytic_kl
from rlhf_core.config import get_profile
from rlhf_core.pipeline import (FIGURES, STAGES, PipelineConfig, clear_stages, stage_file, stage_paths,
                                stages_from)

POLICY_STAGES = ("base", "demonstrations", "sft", "ppo", "dpo", "best_of_n")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The tiny pipeline, run through the command line: (out folder, metrics, printed text)."""
    out = tmp_path_factory.mktemp("pipeline")
    assert main(["run", "--profile", "tiny", "--out", str(out), "--device", "cpu"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_schema(first_run):
    out, metrics = first_run
    assert metrics["profile"] == "tiny"
    assert metrics["eval_prompts"] == get_profile("tiny").n_eval_prompts
    for stage in POLICY_STAGES:
        assert math.isfinite(metrics[stage]["gold"]), stage
        assert 0 < metrics[stage]["gold_se"] < 0.1, stage
    for stage in ("sft", "ppo", "dpo", "best_of_n"):
        assert math.isfinite(metrics[stage]["reward"]) and math.isfinite(metrics[stage]["kl"]), stage
    for key in ("accuracy_labels", "accuracy_gold"):
        assert 0 <= metrics["reward_model"][key] <= 1
    assert metrics["best_of_n"]["n"] == PipelineConfig().best_of_n
    assert set(metrics["seconds"]) == set(STAGES) | {"total"}
    assert set(metrics["cached"]) == set(STAGES)
    assert all(isinstance(value, bool) for value in metrics["checks"].values())


def test_report_and_figures_are_written(first_run):
    out, metrics = first_run
    report = (out / "report.md").read_text()
    for text in ("| SFT |", "| PPO |", "| DPO |", "best-of-", "reward model", "gold_vs_kl.png"):
        assert text in report
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["ppo"]["gold"]) == metrics["ppo"]["iterations"] > 0


def test_sft_reaches_the_demonstrators(first_run):
    _, metrics = first_run
    assert abs(metrics["sft"]["gold"] - metrics["demonstrations"]["gold"]) < 0.1
    assert metrics["sft"]["gold"] > metrics["base"]["gold"] + 0.1
    assert metrics["sft"]["kl"] == pytest.approx(0.0, abs=1e-4)  # pi_ref is the SFT model itself


def test_the_reward_model_ranks_held_out_pairs_well_above_chance(first_run):
    _, metrics = first_run
    assert metrics["reward_model"]["accuracy_labels"] > 0.6
    assert metrics["reward_model"]["accuracy_gold"] > 0.6
    assert abs(metrics["sft"]["reward"]) < 0.5  # normalised on SFT samples: 0 +- 1


def test_ppo_dpo_and_best_of_n_beat_sft_in_gold(first_run):
    _, metrics = first_run
    sft = metrics["sft"]["gold"]
    for stage in ("ppo", "dpo", "best_of_n"):
        assert metrics[stage]["gold"] > sft + 0.05, stage
        assert metrics[stage]["kl"] > 0, stage
        assert metrics["checks"][f"{stage}_beats_sft"], stage
    assert metrics["ppo"]["reward"] > metrics["sft"]["reward"]
    assert metrics["best_of_n"]["kl"] == pytest.approx(analytic_kl(metrics["best_of_n"]["n"]), abs=1e-3)


def test_a_second_run_reuses_every_stage(first_run, tmp_path, capsys):
    _, first = first_run
    started = time.perf_counter()
    assert main(["run", "--profile", "tiny", "--out", str(tmp_path), "--device", "cpu"]) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert all(metrics["cached"].values()), metrics["cached"]
    assert printed.count("cached in") == len(STAGES)
    assert seconds < 60, f"a fully cached run took {seconds:.0f} s"
    for stage in POLICY_STAGES:  # the very same measurements
        assert metrics[stage]["gold"] == first[stage]["gold"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "gold_vs_kl.png").exists()


# ----- --fresh and --until, on a private cache folder so nothing shared is rebuilt -----------------


def test_fresh_rebuilds_the_chosen_stage_and_leaves_the_others(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_profile("tiny")
    out = tmp_path / "out"
    command = ["run", "--profile", "tiny", "--out", str(out), "--until", "demonstrations", "--device", "cpu"]

    assert main(command) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["seconds"]) == {"base", "demonstrations", "total"} and "sft" not in metrics
    assert metrics["cached"] == {"base": False, "demonstrations": False}
    demonstrations = stage_paths(profile, "demonstrations")[0]
    original = demonstrations.read_text()

    assert main(command) == 0  # everything reused
    assert json.loads((out / "metrics.json").read_text())["cached"] == {"base": True, "demonstrations": True}

    # Spoil the cached demonstrations: a plain rerun keeps the file (and measures it again) ...
    demonstrations.write_text(original + original.splitlines(keepends=True)[0])
    assert main(command) == 0
    spoiled = json.loads((out / "metrics.json").read_text())
    assert spoiled["demonstrations"]["train_records"] == metrics["demonstrations"]["train_records"] + 1
    assert spoiled["cached"] == {"base": True, "demonstrations": False}

    # ... --fresh demonstrations writes it again, and leaves the base stage's measurement alone.
    capsys.readouterr()
    assert main(command + ["--fresh", "demonstrations"]) == 0
    assert "--fresh: deleted" in capsys.readouterr().out
    assert demonstrations.read_text() == original
    rebuilt = json.loads((out / "metrics.json").read_text())
    assert rebuilt["cached"] == {"base": True, "demonstrations": False}
    assert rebuilt["demonstrations"] == metrics["demonstrations"]

    assert main(command + ["--fresh"]) == 0  # everything
    assert json.loads((out / "metrics.json").read_text())["cached"] == {"base": False, "demonstrations": False}


def test_stages_from_follows_the_dependencies():
    assert stages_from(None) == stages_from("all") == list(STAGES)
    assert stages_from("sft") == ["sft", "preferences", "reward_model", "ppo", "dpo", "best_of_n"]
    assert stages_from("reward_model") == ["reward_model", "ppo", "best_of_n"]
    assert stages_from("preferences") == ["preferences", "reward_model", "ppo", "dpo", "best_of_n"]
    assert stages_from("dpo") == ["dpo"]
    with pytest.raises(ValueError, match="unknown stage"):
        stages_from("rlhf")


def test_clear_stages_deletes_only_the_selected_profiles_stage_files(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_profile("tiny")
    root = tmp_path / "cache" / "tiny"
    pipeline_paths = {stage: stage_paths(profile, stage) for stage in STAGES}
    for paths in pipeline_paths.values():
        for path in paths:  # folders get a file inside, files are files
            target = path if path.name.endswith((".json", ".jsonl")) else path / "model.safetensors"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("x")
    keep = [root / "chapter01_my_preferences.jsonl",  # a person's labels
            root / "ppo-beta0.5-0123abcd" / "ppo_summary.json",  # a chapter's run with another config
            root / "dpo-beta0.5" / "model.safetensors",
            tmp_path / "cache" / "small" / "sft" / "model.safetensors",  # another profile
            tmp_path / "cache" / "base-small" / "model.safetensors"]  # a pretrained base model
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep")

    deleted = clear_stages(profile, stages_from("reward_model"))
    for stage in STAGES:
        for path in pipeline_paths[stage]:
            if stage in ("reward_model", "ppo", "best_of_n"):
                assert not path.exists(), path
            else:
                assert path.exists(), path
    assert stage_file(profile, "reward_model") in deleted

    clear_stages(profile, STAGES)
    assert not any(path.exists() for paths in pipeline_paths.values() for path in paths)
    assert all(path.read_text() == "keep" for path in keep)


def test_clear_stages_refuses_paths_outside_the_profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_profile("tiny")
    outside = tmp_path / "data" / "sft"
    outside.mkdir(parents=True)
    (tmp_path / "cache" / "tiny").mkdir(parents=True)
    (tmp_path / "cache" / "tiny" / "sft").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RuntimeError, match="refusing to delete"):
        clear_stages(profile, ["sft"])
    assert outside.exists()
