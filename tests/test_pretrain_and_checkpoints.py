"""The base-model script really trains, and an interrupted run resumes to the same weights."""

import json

import pytest
import torch

from rlhf_core.models import load_causal_lm
from rlhf_core.pretrain import PretrainConfig, pretrain
from rlhf_core.training import NonFiniteLossError, check_finite, cosine_with_warmup

SMALL_RUN = PretrainConfig(
    steps=12,
    batch_size=8,
    learning_rate=3e-3,
    warmup_steps=2,
    n_train_reviews=400,
    n_validation_reviews=64,
    eval_every=6,
    checkpoint_every=4,
    seed=1,
)


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_pretraining_lowers_the_loss_and_saves_a_loadable_model(tmp_path, tiny_profile, tokenizer):
    model, summary = pretrain(tiny_profile, tmp_path / "base", SMALL_RUN, tokenizer=tokenizer, progress=False)
    losses = [h["validation_loss"] for h in summary["history"] if "validation_loss" in h]
    assert summary["finished"] and len(losses) == 3  # before training, after step 6 and after step 12
    assert losses[0] > 0.9 * torch.log(torch.tensor(float(len(tokenizer)))).item()  # a random model: a uniform guess
    assert losses[-1] < 0.7 * torch.log(torch.tensor(float(len(tokenizer)))).item()  # far below a uniform guess
    assert (tmp_path / "base" / "model.safetensors").exists()
    assert not (tmp_path / "base" / "checkpoint").exists()
    assert json.loads((tmp_path / "base" / "pretrain_summary.json").read_text())["parameters"] == summary["parameters"]
    loaded = load_causal_lm(tmp_path / "base")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, tiny_profile, tokenizer):
    uninterrupted, _ = pretrain(tiny_profile, tmp_path / "a", SMALL_RUN, tokenizer=tokenizer, progress=False)
    partial, summary = pretrain(
        tiny_profile, tmp_path / "b", SMALL_RUN, tokenizer=tokenizer, progress=False, stop_after_steps=5
    )
    assert summary == {"finished": False, "step": 5, "history": summary["history"]}
    assert [row["step"] for row in summary["history"]] == list(range(6))
    assert (tmp_path / "b" / "checkpoint" / "training_state.pt").exists()
    torch.manual_seed(12345)  # the disconnect scrambles the global random state: resume must restore it
    resumed, summary = pretrain(tiny_profile, tmp_path / "b", SMALL_RUN, tokenizer=tokenizer, progress=False)
    assert summary["finished"] and [row["step"] for row in summary["history"]] == list(range(SMALL_RUN.steps + 1))
    expected = _state(uninterrupted)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_nan_guard_names_the_step_and_quantity():
    check_finite(torch.tensor(1.5), "loss", 3)
    with pytest.raises(NonFiniteLossError, match="value loss is nan at step 7"):
        check_finite(torch.tensor(float("nan")), "value loss", 7)
    with pytest.raises(NonFiniteLossError, match="inf at step 2"):
        check_finite(float("inf"), "policy loss", 2)


def test_learning_rate_schedule():
    lrs = [cosine_with_warmup(s, 100, 10, 1.0, final_fraction=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
