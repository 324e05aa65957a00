"""The cache mechanism alone: identities, completion marks, damaged files (``rlhf_core.cache``)."""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from rlhf_core import cache


@dataclass
class ToyConfig:
    steps: int = 3  # a field, as every stage config has
    beta: float = 0.1


@pytest.fixture
def profile(tiny_profile, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    return tiny_profile


def _write_weights(folder, n=64):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(n, dtype=torch.float32), "b": torch.ones(3)}, str(folder / "model.safetensors"))


def test_the_key_covers_config_and_inputs(profile):
    entry = cache.stage_entry(profile, "toy", ToyConfig(), {"sft": "abc"})
    assert entry.folder.name == f"toy-{entry.key}"
    assert cache.stage_entry(profile, "toy", ToyConfig(), {"sft": "abc"}) == entry  # stable
    others = [
        cache.stage_entry(profile, "toy", ToyConfig(steps=4), {"sft": "abc"}),  # another config
        cache.stage_entry(profile, "toy", ToyConfig(), {"sft": "abd"}),  # another input
        cache.stage_entry(profile, "toy2", ToyConfig(), {"sft": "abc"}),  # another stage
    ]
    assert len({entry.folder, *(other.folder for other in others)}) == 4
    labelled = cache.stage_entry(profile, "toy", ToyConfig(), {"sft": "abc"}, label="beta0.1")
    assert labelled.key == entry.key and labelled.folder.name == f"toy-beta0.1-{entry.key}"


def test_another_precision_is_another_entry(profile, monkeypatch):
    default = cache.stage_entry(profile, "toy", ToyConfig())
    monkeypatch.setenv("RLHF_PRECISION", "bf16")
    assert cache.stage_entry(profile, "toy", ToyConfig()).folder != default.folder
    monkeypatch.setenv("RLHF_PRECISION", "auto")
    assert cache.stage_entry(profile, "toy", ToyConfig()).folder == default.folder


def test_finished_only_after_the_manifest_and_the_digest_follows_the_files(profile):
    entry = cache.stage_entry(profile, "toy", ToyConfig())
    _write_weights(entry.folder)
    assert not cache.is_finished(entry)  # weights alone (e.g. mid-training) are not a result
    manifest = cache.finish(entry, ["model.safetensors"])
    assert cache.is_finished(entry)
    assert manifest["files"]["model.safetensors"]["bytes"] == (entry.folder / "model.safetensors").stat().st_size
    first = entry.digest
    _write_weights(entry.folder, n=65)  # other weights: another digest for the stages built on it
    cache.finish(entry, ["model.safetensors"])
    assert entry.digest != first


def test_a_truncated_weights_file_is_reported_in_one_line_and_removed(profile):
    entry = cache.stage_entry(profile, "toy", ToyConfig())
    _write_weights(entry.folder)
    cache.finish(entry, ["model.safetensors"])
    weights = entry.folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a full disk cut the file short
    lines = []
    assert not cache.is_finished(entry, announce=lines.append)
    assert len(lines) == 1 and "toy" in lines[0] and "damaged" in lines[0] and "rebuilding" in lines[0]
    assert not entry.folder.exists()


@pytest.mark.parametrize("cut", [4, 20, -1])
def test_safetensors_problem_finds_every_kind_of_cut(tmp_path, cut):
    _write_weights(tmp_path)
    weights = tmp_path / "model.safetensors"
    assert cache.safetensors_problem(weights) is None
    weights.write_bytes(weights.read_bytes()[:cut])
    assert cache.safetensors_problem(weights) is not None


def test_a_manifest_of_another_key_is_not_served(profile):
    entry = cache.stage_entry(profile, "toy", ToyConfig())
    _write_weights(entry.folder)
    cache.finish(entry, ["model.safetensors"])
    manifest = json.loads(entry.manifest_path.read_text())
    manifest["key"] = "0" * 12
    entry.manifest_path.write_text(json.dumps(manifest))
    assert not cache.is_finished(entry, announce=lambda line: None)


def test_cached_json_recomputes_on_another_key_or_a_damaged_file(tmp_path):
    path = tmp_path / "m.json"
    calls = []

    def compute():
        calls.append(1)
        return {"gold": 0.5}

    assert cache.cached_json(path, "k1", compute) == ({"gold": 0.5}, False)
    assert cache.cached_json(path, "k1", compute) == ({"gold": 0.5}, True)
    assert cache.cached_json(path, "k2", compute) == ({"gold": 0.5}, False)
    path.write_text('{"key": "k2", "res')  # cut short
    assert cache.cached_json(path, "k2", compute) == ({"gold": 0.5}, False)
    assert len(calls) == 3
