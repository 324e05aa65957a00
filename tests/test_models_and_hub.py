"""The GPU profile's loading path, tested offline on local folders; clear errors when it cannot load."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from rlhf_core.models import count_parameters, disable_dropout, load_causal_lm
from rlhf_core.tokenizer import load_tokenizer


def _gpt2_shaped(n_layer=12, n_embd=768, vocab_size=50257):
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=12, vocab_size=vocab_size, n_positions=1024)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def test_gpt2_shaped_model_round_trips_through_a_local_folder(tmp_path):
    # The real gpt2 has n_layer=12, n_embd=768, vocab 50257 (124M parameters); CI keeps its width and
    # heads but two layers and a smaller vocabulary, so the folder is ~20 MB instead of 500 MB.
    model = _gpt2_shaped(n_layer=2, vocab_size=8000)
    model.save_pretrained(tmp_path / "gpt2-like", safe_serialization=True)
    assert (tmp_path / "gpt2-like" / "model.safetensors").exists()
    loaded = load_causal_lm(tmp_path / "gpt2-like")
    assert loaded.config.n_embd == 768 and not loaded.training
    assert count_parameters(loaded) == count_parameters(model)
    ids = torch.randint(0, 8000, (2, 10))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, loaded(ids).logits, atol=1e-5)
    assert all(m.p == 0 for m in loaded.modules() if isinstance(m, torch.nn.Dropout))


def test_gpt2_tokenizer_without_pad_gets_pad_equal_to_eos(tmp_path, tokenizer):
    # A tokenizer saved without a pad token, as the hub's gpt2 is.
    fast = GPT2TokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.pad_token_id == loaded.eos_token_id


def test_unreachable_hub_names_the_tiny_profile(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="tiny"):
        load_causal_lm("rlhf-course/no-such-model")
    with pytest.raises(OSError, match="tiny"):
        load_tokenizer("rlhf-course/no-such-model")


def test_missing_local_checkpoint_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m rlhf_core pretrain --profile small"):
        load_causal_lm(tmp_path / "base-small")


def test_disable_dropout():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    disable_dropout(model)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
