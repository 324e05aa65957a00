"""Shared fixtures. Every test runs offline: the hub is switched off before transformers loads."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_core.config import get_profile  # noqa: E402
from rlhf_core.models import new_model  # noqa: E402
from rlhf_core.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_profile():
    return get_profile("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_profile):
    """The shipped offline tokenizer: pad and EOS are different tokens."""
    return load_tokenizer(tiny_profile.tokenizer)


@pytest.fixture(scope="session")
def tokenizer_pad_is_eos(tokenizer):
    """The same tokenizer padded the GPT-2 way (pad == EOS), the classic trap."""
    gpt2_style = copy.deepcopy(tokenizer)
    gpt2_style.pad_token = gpt2_style.eos_token
    assert gpt2_style.pad_token_id == gpt2_style.eos_token_id
    return gpt2_style


@pytest.fixture(params=["pad_differs", "pad_is_eos"])
def any_tokenizer(request, tokenizer, tokenizer_pad_is_eos):
    return tokenizer if request.param == "pad_differs" else tokenizer_pad_is_eos


@pytest.fixture(scope="session")
def random_tiny_model(tiny_profile, tokenizer):
    """A randomly initialised model of the tiny shape: fast, and every log-prob is non-trivial."""
    torch.manual_seed(0)
    return new_model(tiny_profile, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id).eval()
