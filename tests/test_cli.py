"""``python -m rlhf_core``: bad input gets one line on stderr (the problem and the fix) and exit status 2,
checked before any stage runs; known errors raised while running are one line too."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf_core.__main__ import answer_errors, checked_device, checked_profile, main
from rlhf_core.config import REPO_DIR, select_device
from rlhf_core.errors import CourseError
from rlhf_core.preferences import PreferenceFileError, load_preferences
from rlhf_core.training import NonFiniteLossError, check_finite


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A private cache folder: a bad command must leave it as it found it (nothing built, nothing measured)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("RLHF_CACHE_DIR", str(folder))
    monkeypatch.delenv("RLHF_PROFILE", raising=False)
    monkeypatch.delenv("RLHF_DEVICE", raising=False)
    return folder


def one_line(capsys) -> str:
    """What a command printed: nothing on stdout, exactly one line on stderr, no traceback."""
    printed = capsys.readouterr()
    assert printed.out == ""
    lines = printed.err.splitlines()
    assert len(lines) == 1, printed.err
    assert "Traceback" not in printed.err and "usage:" not in printed.err
    return lines[0]


def bad_out_file(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    return path


BAD_RUNS = {
    "unknown profile": (["--profile", "huge"], ["--profile huge", "tiny, small, gpt2, gpt2-medium, gpt2-large, auto"]),
    "nonsense device": (["--device", "gpu"], ["--device gpu", "use cpu, cuda"]),
    "best-of-0": (["--best-of-n", "0"], ["--best-of-n 0", "at least 1"]),
    "negative best-of-n": (["--best-of-n", "-4"], ["--best-of-n -4", "at least 1"]),
    "negative seed": (["--seed", "-1"], ["--seed -1", "use --seed 0"]),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_arguments_are_one_line_and_exit_2_before_any_stage(case, empty_cache, tmp_path, capsys):
    arguments, expected = BAD_RUNS[case]
    assert main(["run", "--out", str(tmp_path / "out"), *arguments]) == 2
    line = one_line(capsys)
    for text in expected:
        assert text in line
    assert not empty_cache.exists() and not (tmp_path / "out").exists()


def test_out_naming_a_file_is_refused_before_any_stage(empty_cache, tmp_path, capsys):
    path = bad_out_file(tmp_path)
    assert main(["run", "--out", str(path), "--device", "cpu"]) == 2
    assert "--out" in (line := one_line(capsys)) and "is a file, not a folder" in line
    assert main(["run", "--out", str(path / "inside"), "--device", "cpu"]) == 2  # a file on the way there
    assert f"{path} is a file" in one_line(capsys)
    assert not empty_cache.exists() and path.read_text() == "not a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(empty_cache, tmp_path, capsys):
    for device in ("cuda", "cuda:1"):
        assert main(["run", "--out", str(tmp_path / "out"), "--device", device]) == 2
        assert one_line(capsys) == (
            f"--device {device}: CUDA is not available on this machine; use --device cpu or leave --device out"
        )
    assert not empty_cache.exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_mps_without_mps(empty_cache, tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "out"), "--device", "mps"]) == 2
    assert "--device mps: Apple's MPS is not available" in one_line(capsys)


def test_the_environment_is_checked_and_named_too(empty_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_PROFILE", "huge")
    assert main(["run", "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys).startswith("RLHF_PROFILE=huge: no such profile")
    monkeypatch.setenv("RLHF_PROFILE", "tiny")
    monkeypatch.setenv("RLHF_DEVICE", "gpu")
    assert main(["run", "--out", str(tmp_path / "out")]) == 2
    assert "RLHF_DEVICE=gpu: not a device" in (line := one_line(capsys)) and "unset RLHF_DEVICE" in line
    assert not empty_cache.exists()


def test_the_defaults_and_empty_variables_pass(empty_cache, monkeypatch):
    assert checked_profile(None) == "auto" and checked_profile("Tiny") == "tiny"
    assert checked_device(None) == select_device() and checked_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("RLHF_PROFILE", "")  # set but empty: as if unset
    monkeypatch.setenv("RLHF_DEVICE", "")
    assert checked_profile(None) == "auto" and checked_device(None) == select_device()
    monkeypatch.setenv("RLHF_PROFILE", "small")
    assert checked_profile(None) == "small" and checked_profile("tiny") == "tiny"  # the flag wins


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--until", "rlhf"], "argument --until: invalid choice: 'rlhf'"),
        (["run", "--fresh", "everything"], "argument --fresh: invalid choice: 'everything'"),
        (["run", "--best-of-n", "eight"], "argument --best-of-n: invalid int value: 'eight'"),
        (["train"], "invalid choice: 'train'"),
        ([], "the following arguments are required"),
    ],
)
def test_usage_errors_are_one_line_with_a_hint(argv, expected, empty_cache, capsys):
    assert main(argv) == 2
    line = one_line(capsys)
    assert line.startswith("python -m rlhf_core") and ": error: " in line and expected in line
    assert line.endswith("--help)")


def test_help_still_prints_the_usage(capsys):
    assert main(["run", "--help"]) == 0
    assert "--best-of-n" in capsys.readouterr().out


def test_pretrain_refuses_a_hub_profile_in_one_line(capsys):
    assert main(["pretrain", "--profile", "gpt2"]) == 2
    assert "--profile gpt2: it starts from the hub checkpoint" in one_line(capsys)


def test_world_prints_reviews(capsys):
    assert main(["world", "--n", "2", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("  prompt:   ") == 2


# ----- errors raised while a command runs ---------------------------------------------------------


def test_a_malformed_preference_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "labels.jsonl"
    good = {"prompt": "I watched it.", "chosen": " Great.", "rejected": " Dull."}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": 3}) + "\n")
    assert issubclass(PreferenceFileError, CourseError) and issubclass(PreferenceFileError, ValueError)
    assert answer_errors(lambda: load_preferences(path)) == 2
    assert one_line(capsys) == f"{path}, line 2: field 'chosen' must be a string, got int"


def test_a_diverged_training_is_one_line_and_exit_1(capsys):
    assert answer_errors(lambda: check_finite(torch.tensor(float("nan")), "loss", 7)) == 1
    line = one_line(capsys)
    assert line.startswith("error: loss is nan at step 7: training stopped.")
    assert issubclass(NonFiniteLossError, RuntimeError)


def test_ctrl_c_exits_130_without_a_traceback(capsys):
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert answer_errors(interrupted) == 130
    assert capsys.readouterr().err == ""


def test_other_errors_keep_their_traceback():
    def broken() -> int:
        raise ZeroDivisionError("a bug, not bad input")

    with pytest.raises(ZeroDivisionError):
        answer_errors(broken)


def test_the_real_command_line(tmp_path):
    """The same through ``python -m rlhf_core`` in a fresh process: one line, status 2, nothing run."""
    env = {name: value for name, value in os.environ.items() if name not in ("RLHF_PROFILE", "RLHF_DEVICE")}
    env["RLHF_CACHE_DIR"] = str(tmp_path / "cache")
    finished = subprocess.run(
        [sys.executable, "-m", "rlhf_core", "run", "--profile", "huge"],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert finished.stdout == ""
    assert finished.stderr.strip().splitlines() == [
        "--profile huge: no such profile; use one of tiny, small, gpt2, gpt2-medium, gpt2-large, auto "
        "(or leave --profile out)"
    ]
    assert not (tmp_path / "cache").exists()
