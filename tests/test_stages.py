"""The stage layer (``rlhf_core.stages``): one cache identity for every stage, built from config *and*
inputs, on a miniature of the course (a few steps of each stage, in a temporary cache folder)."""

import dataclasses

import pytest
import torch

from rlhf_core import cache, dpo_data, stages
from rlhf_core.config import with_overrides
from rlhf_core.dpo import DPOConfig, precompute_reference_logps
from rlhf_core.preferences import PreferenceConfig
from rlhf_core.reward_model import RewardModelConfig
from rlhf_core.rlhf import PPOConfig
from rlhf_core.sft import SFTConfig

QUICK = {
    SFTConfig: SFTConfig(steps=3, batch_size=8, heldout_records=16, eval_every=3),
    PreferenceConfig: PreferenceConfig(n_prompts=24, max_new_tokens=8, generation_batch_size=24),
    RewardModelConfig: RewardModelConfig(steps=2, batch_size=8, eval_every=0, n_normalization_prompts=16),
    PPOConfig: PPOConfig(iterations=1, prompts_per_iteration=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=8),
    DPOConfig: DPOConfig(steps=2, batch_size=4, eval_every=0, max_heldout_pairs=4, max_response_tokens=8),
}


@pytest.fixture
def quick(tiny_profile, tmp_path, monkeypatch):
    """Every stage's defaults shrunk to seconds, in an empty cache folder."""
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    for config_class, config in QUICK.items():
        monkeypatch.setattr(
            config_class,
            "for_profile",
            classmethod(lambda cls, profile=None, _c=config, **overrides: with_overrides(_c, overrides)),
        )
    return tiny_profile


def _same_weights(first, second) -> bool:
    return all(torch.equal(tensor, second.state_dict()[name]) for name, tensor in first.state_dict().items())


def test_sft_trains_once_then_loads(quick, monkeypatch):
    policy, reference, _ = stages.load_or_train_sft(quick, device="cpu", progress=False)
    entry = stages.sft_entry(quick)
    assert cache.is_finished(entry) and entry.folder.name.startswith("sft-")
    assert not any(p.requires_grad for p in reference.parameters())
    assert stages.sft_summary(quick)["history"][-1]["step"] == 3

    def no_training(*args, **kwargs):
        raise AssertionError("the cached SFT model should have been loaded")

    monkeypatch.setattr(stages.inputs, "train_sft", no_training)
    again, _, _ = stages.load_or_train_sft(quick, device="cpu", progress=False)
    assert _same_weights(again, policy)
    other = dataclasses.replace(QUICK[SFTConfig], steps=4)
    assert stages.sft_dir(quick, other) != entry.folder  # another config never shares the folder


def test_the_demonstrations_are_the_same_file_every_time(quick):
    entry = stages.ensure_demonstrations(quick)
    first = (entry.folder / stages.DEMONSTRATIONS_FILE).read_bytes()
    stages.ensure_demonstrations(quick, rebuild=True)
    assert (entry.folder / stages.DEMONSTRATIONS_FILE).read_bytes() == first
    assert stages.load_or_write_demonstrations(quick).num_rows == len(first.splitlines())


def test_ppo_is_retrained_when_the_reward_model_changes(quick, capsys):
    """The bug this layer fixes: PPO was reused on config equality alone, so a chapter that retrained
    the reward model and then asked for PPO got a policy trained against the old reward model."""
    config = PPOConfig.for_profile(quick)
    policy, history, _ = stages.load_or_train_ppo(quick, config, device="cpu", progress=False)
    first = stages.ppo_entry(quick, config)
    assert cache.is_finished(first) and len(history) == 1

    # a chapter retrains the reward model (here: the same config, other weights) and caches it
    reward_model, tokenizer, metrics = stages.load_or_train_reward_model(quick, device="cpu", progress=False)
    sft_policy, _, _ = stages.load_or_train_sft(quick, device="cpu", progress=False)
    with torch.no_grad():
        reward_model.score.weight.add_(0.5)
    records = stages.load_or_build_preferences(quick, device="cpu", progress=False)
    stages.finish_reward_model(
        quick,
        reward_model,
        tokenizer,
        sft_policy,
        RewardModelConfig.for_profile(quick),
        records[:8],
        records[8:],
        metrics["history"],
        0.0,
    )

    second = stages.ppo_entry(quick, config)
    assert second.folder != first.folder and not cache.is_finished(second)  # asking for PPO now retrains
    retrained, _, _ = stages.load_or_train_ppo(quick, config, device="cpu", progress=False)
    assert cache.is_finished(second) and cache.is_finished(first)  # the old run is kept, not overwritten
    assert not _same_weights(retrained, policy)


def test_a_reward_model_of_another_config_has_its_own_folder(quick):
    default = stages.reward_model_path(quick)
    other = stages.reward_model_path(quick, dataclasses.replace(QUICK[RewardModelConfig], learning_rate=5e-4))
    assert default != other and default.parent == other.parent


def test_a_cut_short_weights_file_is_rebuilt_with_one_line(quick, capsys):
    stages.load_or_train_sft(quick, device="cpu", progress=False)
    weights = stages.sft_dir(quick) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a full disk
    capsys.readouterr()
    policy, _, _ = stages.load_or_train_sft(quick, device="cpu", progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(lines) == 1 and "sft" in lines[0]
    assert cache.safetensors_problem(weights) is None and next(policy.parameters()).isfinite().all()


def test_dpo_folders_differ_per_beta_and_config(quick):
    folder = stages.dpo_dir(quick, 0.3)
    assert folder.name.startswith("dpo-beta0.3-")
    assert stages.dpo_dir(quick, 0.3, DPOConfig.for_profile(quick)) == folder
    assert stages.dpo_dir(quick, 0.1) != folder
    assert stages.dpo_dir(quick, 0.3, DPOConfig.for_profile(quick, steps=5)) != folder


def test_reference_log_probs_file_computes_each_pair_once(tmp_path, tokenizer, random_tiny_model, monkeypatch):
    from test_dpo import world_pairs

    pairs = world_pairs(6, seed=15)
    path = tmp_path / "reference.json"

    def logps(rows=None):
        return stages.cached_reference_logps(path, random_tiny_model, tokenizer, pairs, rows, 64, None)

    first = logps([0, 2, 3])
    assert torch.isnan(first[0][[1, 4, 5]]).all() and path.exists()
    computed = []
    original = dpo_data.precompute_reference_logps

    def counting(model, tok, records, *args):
        computed.extend(records)
        return original(model, tok, records, *args)

    monkeypatch.setattr(dpo_data, "precompute_reference_logps", counting)
    again = logps([0, 2, 3])
    assert computed == []  # all read back from the file, to the bit
    assert torch.equal(again[0][[0, 2, 3]], first[0][[0, 2, 3]])
    everything = logps()
    assert computed == [pairs[1], pairs[4], pairs[5]]  # only the new ones
    torch.testing.assert_close(everything, precompute_reference_logps(random_tiny_model, tokenizer, pairs))
    path.write_text('{"abc": [1.0')  # cut short: recomputed, never served
    computed.clear()
    logps()
    assert len(computed) == 6
