"""Data parallelism under ``accelerate launch`` (``rlhf_core.distributed``): two CPU processes.

``tests/distributed_script.py`` trains every trainer for a few steps, once in one process and once in
two (``accelerate launch --cpu --num_processes 2``), on the same global batches. The two processes
must hold the same weights, bit for bit, after every trainer; SFT, the reward model and DPO must
follow the single process's loss trajectory; PPO and the critic-free loop must sample different
responses in each process. Then the pipeline command itself, in two processes, must still tell the
course's story: SFT reaches the demonstrators, DPO beats SFT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_core import distributed, launch
from rlhf_core.errors import CourseError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "distributed_script.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
EXACT_TRAINERS = ("sft", "reward_model", "dpo")  # batches a pure function of the step: one process's numbers


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RLHF_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }


def run(command: list[str], tmp_path: Path, timeout: int) -> float:
    """Run ``command`` in the repository; fail with its output's tail. Returns its seconds."""
    started = time.perf_counter()
    finished = subprocess.run(
        command, cwd=REPO, env=environment(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    assert finished.returncode == 0, (
        f"{' '.join(command)} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-5000:]}"
    )
    seconds = time.perf_counter() - started
    print(f"{' '.join(command[-6:])}: {seconds:.0f} s")
    return seconds


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each process's results: ``(one process, [two processes' results])``."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    run([sys.executable, str(SCRIPT), str(tmp_path / "one")], tmp_path, timeout=600)
    run([*ACCELERATE, str(SCRIPT), str(tmp_path / "two")], tmp_path, timeout=600)
    one = json.loads((tmp_path / "one" / "process-0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"process-{i}.json").read_text()) for i in range(2)]
    return one, two


def test_accelerate_launch_starts_two_processes(trained):
    one, two = trained
    assert (one["process"], one["processes"]) == (0, 1)
    assert [(result["process"], result["processes"]) for result in two] == [(0, 2), (1, 2)]


def test_every_trainer_leaves_the_processes_with_the_same_weights(trained):
    _, (first, second) = trained
    assert set(first["digests"]) == {
        "sft",
        "reward_model",
        "dpo",
        "ppo",
        "ppo_value_model",
        "ppo_resumed",
        "critic_free",
    }
    assert first["digests"] == second["digests"]
    # and they trained: the weights moved away from one another's trainers
    assert len(set(first["digests"].values())) == len(first["digests"]) - 1  # ppo_resumed is ppo


def test_a_resumed_ppo_run_in_two_processes_ends_where_an_uninterrupted_one_does(trained):
    _, (first, _) = trained
    assert first["digests"]["ppo_resumed"] == first["digests"]["ppo"]


@pytest.mark.parametrize("trainer", EXACT_TRAINERS)
def test_two_processes_follow_one_process_with_the_same_global_batch(trained, trainer):
    one, two = trained
    single = one["histories"][trainer]
    assert len(single) > 3
    for result in two:
        history = result["histories"][trainer]
        assert [row["step"] for row in history] == [row["step"] for row in single]
        for alone, split in zip(single, history):
            assert set(split) == set(alone)
            for key, value in alone.items():
                if key == "grad_norm" or not isinstance(value, float):
                    continue
                assert split[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (trainer, alone["step"], key)


def test_the_logged_histories_are_the_same_in_every_process(trained):
    _, (first, second) = trained
    for trainer in ("ppo", "critic_free"):
        strip = [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in first["histories"][trainer]]
        other = [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in second["histories"][trainer]]
        assert strip == other
        assert len(strip) == 2
    assert first["histories"]["ppo"][-1]["kl_coef"] != first["histories"]["ppo"][0]["kl_coef"]  # adapted, alike


def test_each_process_samples_its_own_responses(trained):
    _, (first, second) = trained
    for key in ("ppo_first_responses", "critic_free_first_responses"):
        assert first[key] and second[key]
        assert first[key] != second[key]


def test_a_global_batch_that_does_not_split_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(distributed, "num_processes", lambda: 3)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    from rlhf_core.rlhf import PPOConfig

    with pytest.raises(CourseError, match="prompts_per_iteration=64 does not split over 3 processes"):
        distributed.split_config(PPOConfig(), ("prompts_per_iteration", "minibatch_size"))


def test_alone_every_helper_gives_back_its_argument():
    import torch

    assert not distributed.is_distributed() and distributed.num_processes() == 1 and distributed.is_main_process()
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
    values = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(distributed.share_of_mean(values, 99), values.mean())
    assert distributed.map_chunks(3, lambda i: i * i) == [0, 1, 4]
    assert distributed.on_main(lambda: "decided") == "decided"
    assert distributed.mean_record({"a": 1.5, "iteration": 2}) == {"a": 1.5, "iteration": 2}
    assert launch.relaunch_cpu_processes() is None


def test_the_pipeline_in_two_processes_tells_the_same_story(tmp_path):
    """``accelerate launch --cpu --num_processes 2 -m rlhf_core run --profile tiny --fresh --until dpo``."""
    out = tmp_path / "out"
    command = [
        *ACCELERATE,
        "-m",
        "rlhf_core",
        "run",
        "--profile",
        "tiny",
        "--fresh",
        "--until",
        "dpo",
        "--out",
        str(out),
    ]
    run(command, tmp_path, timeout=1500)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["checks"]["sft_matches_demonstrators"], (metrics["sft"]["gold"], metrics["demonstrations"]["gold"])
    assert metrics["dpo"]["gold"] > metrics["sft"]["gold"]
    assert metrics["checks"]["dpo_beats_sft"]
    assert metrics["checks"]["reward_model_beats_chance"]
    print({stage: metrics[stage]["gold"] for stage in ("demonstrations", "sft", "ppo", "dpo")})
