"""``python -m rlhf_core run``: the whole pipeline on the tiny profile, its claims, its cache, ``--fresh``;
and the report and figures (``rlhf_core.report``) written from a run's results.

The module's first test runs the real tiny pipeline once, in the shared cache folder (``cache/``):
what it builds (SFT, reward model, PPO, DPO, GRPO, RLOO) is what the notebooks load afterwards.
"""

import json
import math
import time

import numpy as np
import pytest

from rlhf_core import stages
from rlhf_core.__main__ import main
from rlhf_core.best_of_n import analytic_kl
from rlhf_core.config import get_profile
from rlhf_core.grpo import CriticFreeConfig
from rlhf_core.pipeline import STAGES, PipelineConfig, clear_measurements, stage_file, stages_from
from rlhf_core.report import FIGURES, claims, collect_metrics, plain_json, results_table, write_json, write_outputs

POLICY_STAGES = ("base", "demonstrations", "sft", "ppo", "dpo", "best_of_n", "grpo", "rloo")
TRAINED_POLICIES = ("ppo", "dpo", "best_of_n", "grpo", "rloo")  # each claims a gold above SFT's


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
    for stage in ("sft", *TRAINED_POLICIES):
        assert math.isfinite(metrics[stage]["reward"]) and math.isfinite(metrics[stage]["kl"]), stage
    for method in ("grpo", "rloo"):
        config = CriticFreeConfig.for_profile("tiny", method=method)
        assert metrics[method]["method"] == method
        assert (metrics[method]["iterations"], metrics[method]["group_size"]) == (config.iterations, config.group_size)
        assert metrics[method]["seconds_per_iteration"] > 0
    for key in ("accuracy_labels", "accuracy_gold"):
        assert 0 <= metrics["reward_model"][key] <= 1
    assert metrics["best_of_n"]["n"] == PipelineConfig().best_of_n
    assert set(metrics["seconds"]) == set(STAGES) | {"total"}
    assert set(metrics["cached"]) == set(STAGES)
    assert all(isinstance(value, bool) for value in metrics["checks"].values())


def test_report_and_figures_are_written(first_run):
    out, metrics = first_run
    report = (out / "report.md").read_text()
    for text in (
        "| SFT |",
        "| PPO |",
        "| DPO |",
        "best-of-",
        "| GRPO |",
        "| RLOO |",
        "reward model",
        "gold_vs_kl.png",
        "GRPO beats SFT",
        "RLOO beats SFT",
    ):
        assert text in report, text
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    curves = json.loads((out / "curves.json").read_text())
    for stage in ("ppo", "grpo", "rloo"):
        assert len(curves[stage]["gold"]) == metrics[stage]["iterations"] > 0, stage


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


def test_grpo_and_rloo_beat_sft_by_two_standard_errors(first_run):
    """The pipeline's default critic-free runs make report.md's two new claims true."""
    _, metrics = first_run
    sft = metrics["sft"]
    for method in ("grpo", "rloo"):
        run = metrics[method]
        two_se = 2 * math.sqrt(run["gold_se"] ** 2 + sft["gold_se"] ** 2)  # of the difference of two means
        assert run["gold"] - sft["gold"] > two_se, (method, run["gold"], sft["gold"], two_se)
        assert metrics["checks"][f"{method}_beats_sft"], method
        assert run["kl"] > 0 and run["reward"] > sft["reward"], method


def test_critic_free_seconds_per_iteration_come_from_the_training_history(first_run):
    _, metrics = first_run
    for method in ("grpo", "rloo"):  # what a notebook loads is the run the pipeline loaded and measured
        _, history, _ = stages.load_or_train_critic_free(
            "tiny", CriticFreeConfig.for_profile("tiny", method=method), device="cpu", progress=False
        )
        seconds = [row["seconds_generate"] + row["seconds_score"] + row["seconds_train"] for row in history]
        assert metrics[method]["seconds_per_iteration"] == pytest.approx(sum(seconds) / len(seconds), abs=1e-3)


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
    out = tmp_path / "out"
    command = ["run", "--profile", "tiny", "--out", str(out), "--until", "demonstrations", "--device", "cpu"]

    assert main(command) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["seconds"]) == {"base", "demonstrations", "total"} and "sft" not in metrics
    assert metrics["cached"] == {"base": False, "demonstrations": False}
    demonstrations = stages.ensure_demonstrations("tiny").folder / stages.DEMONSTRATIONS_FILE
    written = demonstrations.stat().st_mtime_ns

    assert main(command) == 0  # everything reused
    assert json.loads((out / "metrics.json").read_text())["cached"] == {"base": True, "demonstrations": True}
    assert demonstrations.stat().st_mtime_ns == written

    # --fresh demonstrations writes them again and measures them again; the base stage's measurement stays
    capsys.readouterr()
    assert main(command + ["--fresh", "demonstrations"]) == 0
    assert "--fresh: rebuilding demonstrations, sft, preferences" in capsys.readouterr().out
    assert demonstrations.stat().st_mtime_ns > written
    rebuilt = json.loads((out / "metrics.json").read_text())
    assert rebuilt["cached"] == {"base": True, "demonstrations": False}
    assert rebuilt["demonstrations"] == metrics["demonstrations"]  # the same seeds: the same numbers

    assert main(command + ["--fresh"]) == 0  # everything
    assert json.loads((out / "metrics.json").read_text())["cached"] == {"base": False, "demonstrations": False}


def test_stages_from_follows_the_dependencies():
    assert stages_from(None) == stages_from("all") == list(STAGES)
    assert stages_from("sft") == ["sft", "preferences", "reward_model", "ppo", "dpo", "best_of_n", "grpo", "rloo"]
    assert stages_from("reward_model") == ["reward_model", "ppo", "best_of_n", "grpo", "rloo"]
    assert stages_from("preferences") == ["preferences", "reward_model", "ppo", "dpo", "best_of_n", "grpo", "rloo"]
    assert stages_from("dpo") == ["dpo"]
    assert stages_from("grpo") == ["grpo"] and stages_from("rloo") == ["rloo"]
    with pytest.raises(ValueError, match="unknown stage"):
        stages_from("rlhf")


def test_clear_measurements_deletes_only_the_selected_stages_measurements(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_profile("tiny")
    root = tmp_path / "cache" / "tiny"
    for stage in STAGES:
        stage_file(profile, stage).parent.mkdir(parents=True, exist_ok=True)
        stage_file(profile, stage).write_text("{}")
    keep = [
        root / "chapter01_my_preferences.jsonl",  # a person's labels
        root / "sft-0123abcd" / "model.safetensors",  # a stage's model: rebuilt by rlhf_core.stages, not here
        tmp_path / "cache" / "small" / "pipeline" / "sft.json",
    ]  # another profile's measurement
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep")

    deleted = clear_measurements(profile, stages_from("reward_model"))
    assert sorted(deleted) == sorted(
        stage_file(profile, stage) for stage in ("reward_model", "ppo", "best_of_n", "grpo", "rloo")
    )
    assert [stage for stage in STAGES if stage_file(profile, stage).exists()] == [
        "base",
        "demonstrations",
        "sft",
        "preferences",
        "dpo",
    ]
    assert clear_measurements(profile, ["ppo"]) == []  # already gone

    clear_measurements(profile, STAGES)
    assert not any(stage_file(profile, stage).exists() for stage in STAGES)
    assert all(path.read_text() == "keep" for path in keep)


def test_clear_measurements_refuses_paths_outside_the_profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    profile = get_profile("tiny")
    outside = tmp_path / "data" / "pipeline"
    outside.mkdir(parents=True)
    (outside / "sft.json").write_text("{}")
    (tmp_path / "cache" / "tiny").mkdir(parents=True)
    (tmp_path / "cache" / "tiny" / "pipeline").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RuntimeError, match="refusing to delete"):
        clear_measurements(profile, ["sft"])
    assert (outside / "sft.json").exists()


def test_pipeline_config_per_profile_and_overrides():
    assert PipelineConfig.for_profile("tiny") == PipelineConfig()
    gpt2 = PipelineConfig.for_profile("gpt2", seed=3)
    assert (gpt2.best_of_n, gpt2.measured_kl_prompts, gpt2.seed) == (16, 32, 3)
    with pytest.raises(TypeError, match="best_of_m"):
        PipelineConfig.for_profile("tiny", best_of_m=4)


# ----- the report, from a run's results (no stage runs) ---------------------------------------------


def _results(ppo_gold: float = 0.6, grpo_gold: float = 0.58) -> dict:
    """What the stages of a run leave in ``run.results``, with made-up numbers."""

    def policy(gold, reward=None, kl=None, **extra):
        metrics = {
            "gold": gold,
            "gold_std": 0.3,
            "gold_se": 0.02,
            "reward": reward,
            "kl": kl,
            "eos_fraction": 0.9,
            "mean_words": 20.0,
            "samples_per_prompt": 1,
            **extra,
        }
        return {
            "metrics": metrics,
            "examples": [{"prompt": "I watched it.", "response": f" A {gold} | film.", "gold": gold}],
        }

    ppo_curves = {
        "iteration": [1, 2, 3],
        "reward_model_score": [0.1, 0.4, 0.8],
        "gold": [0.4, 0.5, 0.6],
        "kl": [0.5, 1, 2],
    }
    critic_free = {"iterations": 3, "group_size": 4, "seconds_per_iteration": 2.5}
    return {
        "base": policy(-0.2),
        "demonstrations": policy(0.42),
        "sft": policy(0.40, kl=0.0, samples_per_prompt=8),
        "preferences": {"metrics": {"pairs": 3000, "labels_agree_with_gold": 0.8}},
        "reward_model": {
            "metrics": {
                "accuracy_labels": 0.7,
                "accuracy_gold": 0.75,
                "labeler_accuracy_cap": 0.8,
                "base_reward": -1.0,
                "demonstrations_reward": 0.1,
                "sft_reward": 0.0,
            },
            "curves": {
                "step": [0, 50],
                "heldout_accuracy_labels": [0.5, 0.7],
                "heldout_accuracy_gold": [0.5, 0.75],
                "heldout_loss": [0.69, 0.6],
                "train_step": list(range(1, 51)),
                "train_loss": list(np.linspace(0.7, 0.5, 50)),
            },
        },
        "ppo": {**policy(ppo_gold, reward=0.9, kl=3.0), "curves": ppo_curves},
        "dpo": {
            **policy(0.41, reward=0.2, kl=1.0, beta=0.1),
            "curves": {
                "step": [0, 10, 20],
                "heldout_accuracy": [0.0, 0.6, 0.65],
                "heldout_reward_margin": [0.0, 0.2, 0.3],
                "heldout_loss": [0.69, 0.65, 0.6],
            },
        },
        "best_of_n": {
            **policy(0.55, reward=1.2, kl=float(analytic_kl(8)), n=8),
            "curves": {
                "n": [1, 2, 4, 8],
                "kl": [float(analytic_kl(k)) for k in (1, 2, 4, 8)],
                "gold": [0.4, 0.45, 0.5, 0.55],
                "reward": [0.0, 0.5, 0.9, 1.2],
            },
        },
        "grpo": {**policy(grpo_gold, reward=0.8, kl=2.0, method="grpo", **critic_free), "curves": ppo_curves},
        "rloo": {**policy(0.45, reward=0.7, kl=1.5, method="rloo", **critic_free), "curves": ppo_curves},
    }


def _metrics(results: dict) -> dict:
    settings = {"profile": "tiny", "device": "cpu", "config": {"seed": 0}, "eval_prompts": 256, "max_new_tokens": 64}
    seconds = {stage: 1.5 for stage in STAGES} | {"total": 12.0}
    return collect_metrics(settings, results, seconds, {stage: stage == "base" for stage in STAGES})


def test_claims_compare_against_two_standard_errors():
    metrics = _metrics(_results())
    assert metrics["checks"] == {
        "sft_matches_demonstrators": True,
        "reward_model_beats_chance": True,
        "ppo_beats_sft": True,
        "dpo_beats_sft": False,
        "best_of_n_beats_sft": True,
        "grpo_beats_sft": True,
        "rloo_beats_sft": False,
    }
    # two standard errors of the difference: 2 * sqrt(0.02^2 + 0.02^2) = 0.0566 above SFT's 0.40
    assert _metrics(_results(ppo_gold=0.4 + 0.0570))["checks"]["ppo_beats_sft"]
    assert not _metrics(_results(ppo_gold=0.4 + 0.0560))["checks"]["ppo_beats_sft"]
    assert _metrics(_results(grpo_gold=0.4 + 0.0570))["checks"]["grpo_beats_sft"]
    assert not _metrics(_results(grpo_gold=0.4 + 0.0560))["checks"]["grpo_beats_sft"]
    assert metrics["sft"]["reward"] == 0.0 and metrics["base"]["reward"] == -1.0  # scored by the reward model
    assert claims({"sft": {"gold": 0.4}}) == {}  # only the stages that ran are checked


def test_outputs_written_from_the_results(tmp_path):
    results = _results()
    metrics = _metrics(results)
    written = write_outputs(metrics, results, tmp_path)
    assert {path.name for path in written} == {"metrics.json", "curves.json", "report.md", *FIGURES}
    for name in FIGURES:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.loads((tmp_path / "metrics.json").read_text()) == plain_json(metrics)
    assert json.loads((tmp_path / "curves.json").read_text())["ppo"]["gold"] == [0.4, 0.5, 0.6]
    report = (tmp_path / "report.md").read_text()
    for text in (
        "| SFT | +0.400 |",
        "| best-of-8 |",
        "- [ ] DPO beats SFT",
        "- [x] PPO beats SFT",
        "![gold_vs_kl]",
        "A 0.6 / film.",
        "| GRPO | +0.580 |",
        "| RLOO | +0.450 |",
        "- [x] GRPO beats SFT",
        "- [ ] RLOO beats SFT",
        "GRPO: 3 iterations, groups of 4 responses per prompt",
    ):
        # "A 0.6 / film.": a "|" in a response would break the table of examples
        assert text in report, text
    table = results_table(metrics)
    assert "claims not met this run: dpo_beats_sft, rloo_beats_sft" in table and "best-of-8" in table
    assert "\nGRPO " in table and "\nRLOO " in table  # rows of the terminal table

    # a rerun that stops earlier leaves no figure of a stage it did not run
    early = {stage: results[stage] for stage in ("base", "demonstrations", "sft")}
    written = write_outputs(_metrics(early), early, tmp_path)
    assert not (tmp_path / "ppo_training.png").exists() and (tmp_path / "gold_per_stage.png").exists()


def test_json_files_are_strict_json(tmp_path):
    write_json(tmp_path / "x.json", {"a": np.float32(0.5), "b": float("nan"), "c": (np.int64(2), np.bool_(True))})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 0.5, "b": None, "c": [2, True]}
