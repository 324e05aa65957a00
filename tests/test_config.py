import pytest
import torch

from rlhf_core.config import get_profile, resolve_profile_name, seed_everything, select_device


def test_profiles_have_the_documented_shapes():
    tiny, small, gpt2 = get_profile("tiny"), get_profile("small"), get_profile("gpt2")
    assert (tiny.n_layer, tiny.n_embd) == (2, 128) and tiny.offline
    assert (small.n_layer, small.n_embd) == (4, 256) and small.offline
    assert gpt2.base_model == "gpt2" and gpt2.prompt_source == "imdb" and not gpt2.offline


def test_auto_picks_tiny_without_cuda(monkeypatch):
    monkeypatch.delenv("RLHF_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_profile_name() == "tiny"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile_name("auto") == "gpt2"


def test_environment_variable_and_argument_choose_the_profile(monkeypatch):
    monkeypatch.setenv("RLHF_PROFILE", "small")
    assert get_profile().name == "small"
    assert get_profile("tiny").name == "tiny"  # the argument wins over the environment
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        get_profile("huge")


def test_device_and_seeding(monkeypatch):
    monkeypatch.delenv("RLHF_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device() == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    seed_everything(3)
    first = torch.rand(4)
    seed_everything(3)
    assert torch.equal(first, torch.rand(4))
