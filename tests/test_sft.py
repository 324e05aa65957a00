"""SFT: the prompt is masked (-100), the loss is plain cross-entropy on the response, an interrupted
run resumes bit for bit, the NaN guard stops it, and a short real run lowers the held-out loss."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from rlhf_core import sft
from rlhf_core.demonstrations import write_demonstrations
from rlhf_core.logprobs import response_logprobs
from rlhf_core.loop import batch_rows
from rlhf_core.models import load_causal_lm
from rlhf_core.prompts import load_prompts
from rlhf_core.sft import (
    IGNORE_INDEX,
    SFTConfig,
    frozen_reference,
    history_series,
    sft_batch,
    sft_labels,
    sft_loss,
    train_sft,
)
from rlhf_core.training import NonFiniteLossError

PROMPTS = ["I watched The Quiet Harbor last night.", "Zorvath is a western.", "My brother took me to see Nimbrook."]
RESPONSES = [" The acting was great.", " I loved the music. Overall, a fine drama.", " Dull."]

TINY_RUN = SFTConfig(
    steps=8,
    batch_size=8,
    learning_rate=1e-3,
    warmup_steps=2,
    heldout_records=16,
    eval_every=4,
    checkpoint_every=3,
    seed=1,
)


@pytest.fixture(scope="module")
def base_model(tiny_profile):
    return load_causal_lm(tiny_profile.base_model)


@pytest.fixture(scope="module")
def records(tiny_profile):
    return write_demonstrations(load_prompts(tiny_profile, "train", 96), seed=2)


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_labels_are_minus_100_exactly_on_prompt_and_padding(any_tokenizer, padding_side):
    batch = sft_batch(any_tokenizer, PROMPTS, RESPONSES, padding_side=padding_side)
    assert torch.equal(batch.labels, sft_labels(batch))
    width = batch.input_ids.shape[1]
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        n_prompt = len(any_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        response_ids = any_tokenizer(response, add_special_tokens=False)["input_ids"] + [any_tokenizer.eos_token_id]
        length = n_prompt + len(response_ids)
        start = 0 if padding_side == "right" else width - length
        expected = [IGNORE_INDEX] * width
        expected[start + n_prompt : start + length] = response_ids  # the response, EOS included
        assert batch.labels[row].tolist() == expected
        labelled = batch.labels[row] != IGNORE_INDEX
        assert batch.labels[row][labelled][-1].item() == any_tokenizer.eos_token_id  # the EOS is a label
        assert torch.equal(labelled.long(), batch.response_mask[row])
    # padding never carries a label, even where the pad id equals EOS
    assert torch.all(batch.labels[batch.attention_mask == 0] == IGNORE_INDEX)


def test_max_response_tokens_cuts_before_the_eos(tokenizer):
    batch = sft_batch(tokenizer, PROMPTS[:1], RESPONSES[1:2], max_response_tokens=3)
    labels = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert len(labels) == 4 and labels[-1] == tokenizer.eos_token_id


def test_loss_equals_a_plain_per_token_loop(random_tiny_model, tokenizer):
    model = random_tiny_model
    torch.manual_seed(0)
    prompts = [[int(t) for t in torch.randint(2, len(tokenizer), (n,))] for n in (3, 5, 1)]
    responses = [[int(t) for t in torch.randint(2, len(tokenizer), (n,))] + [tokenizer.eos_token_id] for n in (4, 1, 6)]
    losses = []  # one row at a time, unpadded, one token at a time
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0]
            for t in range(len(prompt), len(prompt) + len(response)):
                losses.append(F.cross_entropy(logits[t - 1][None], ids[0, t][None]).item())
    expected = sum(losses) / len(losses)
    for side in ("right", "left"):
        batch = sft._pack_with_labels(prompts, responses, tokenizer.pad_token_id, side)
        with torch.no_grad():
            assert sft_loss(model, batch).item() == pytest.approx(expected, rel=1e-5)
    # the same number as Hugging Face's own labels= loss (which also reads -100 as "ignore")
    batch = sft._pack_with_labels(prompts, responses, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        hf_loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert hf_loss.item() == pytest.approx(expected, rel=1e-5)


def test_an_epoch_drops_the_incomplete_last_batch():
    assert SFTConfig(epochs=2, batch_size=8).total_steps(35) == 8  # 4 full batches of 8 per epoch
    first_epoch = [row for step in range(4) for row in batch_rows(step, 35, 8, seed=3, drop_last=True)]
    assert len(set(first_epoch)) == 32  # a permutation, the incomplete last batch dropped
    assert batch_rows(4, 35, 8, seed=3, drop_last=True) != batch_rows(0, 35, 8, seed=3, drop_last=True)


def test_interrupted_sft_resumes_to_the_same_weights(tmp_path, base_model, tokenizer, records):
    seen = []
    uninterrupted, full_history = train_sft(
        copy.deepcopy(base_model),
        tokenizer,
        records,
        TINY_RUN,
        out_dir=tmp_path / "a",
        progress=False,
        callback=seen.append,
    )
    assert seen == full_history[1:]  # the callback gets every step's record
    partial, history = train_sft(
        copy.deepcopy(base_model),
        tokenizer,
        records,
        TINY_RUN,
        out_dir=tmp_path / "b",
        progress=False,
        stop_after_steps=5,
    )
    assert history[-1]["step"] == 5 and (tmp_path / "b" / "checkpoint" / "training_state.pt").exists()
    assert not (tmp_path / "b" / sft.SUMMARY_FILE).exists()
    torch.manual_seed(12345)  # the disconnect scrambles the global random state: resume must restore it
    resumed, history = train_sft(
        copy.deepcopy(base_model), tokenizer, records, TINY_RUN, out_dir=tmp_path / "b", progress=False
    )
    assert history == full_history and [row["step"] for row in history] == list(range(TINY_RUN.steps + 1))
    expected = _state(uninterrupted)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    summary = json.loads((tmp_path / "b" / sft.SUMMARY_FILE).read_text())
    assert summary["finished"] and summary["config"] == json.loads(json.dumps(TINY_RUN.__dict__))
    assert not (tmp_path / "b" / "checkpoint").exists()
    loaded = load_causal_lm(tmp_path / "b")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path, base_model, tokenizer, records):
    train_sft(
        copy.deepcopy(base_model), tokenizer, records, TINY_RUN, out_dir=tmp_path, progress=False, stop_after_steps=3
    )
    other = SFTConfig(**{**TINY_RUN.__dict__, "learning_rate": 5e-4})
    with pytest.warns(UserWarning, match="another config"):
        _, history = train_sft(copy.deepcopy(base_model), tokenizer, records, other, out_dir=tmp_path, progress=False)
    assert history[-1]["step"] == other.steps and len(history) == other.steps + 1


def test_nan_guard_stops_with_the_step_named(base_model, tokenizer, records):
    poisoned = copy.deepcopy(base_model)
    with torch.no_grad():
        poisoned.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="SFT loss is nan at step 0"):
        train_sft(poisoned, tokenizer, records, TINY_RUN, progress=False)
    exploding = SFTConfig(**{**TINY_RUN.__dict__, "learning_rate": 1e35, "warmup_steps": 0})
    with pytest.raises(NonFiniteLossError, match=r"at step [1-7]\b"):
        train_sft(copy.deepcopy(base_model), tokenizer, records, exploding, progress=False)


def test_a_short_real_run_lowers_the_heldout_loss(base_model, tokenizer, tiny_profile):
    records = write_demonstrations(load_prompts(tiny_profile, "train", 640), seed=0)
    config = SFTConfig(
        steps=30, batch_size=16, learning_rate=3e-4, warmup_steps=5, heldout_records=128, eval_every=15, seed=0
    )
    model, history = train_sft(copy.deepcopy(base_model), tokenizer, records, config, progress=False)
    steps, heldout = history_series(history, "heldout_loss")
    assert steps == [0, 15, 30]
    # The base model already writes the world's reviews: SFT only shifts *which* ones, a small gain.
    assert heldout[2] < heldout[1] < heldout[0] - 0.002
    _, lrs = history_series(history, "lr")
    assert lrs[4] == pytest.approx(3e-4) and lrs[-1] < lrs[10]  # warmup, then decay
    assert all(row["response_tokens"] > 16 for row in history[1:])  # 16 responses with an EOS each, and more


def test_a_short_run_teaches_a_random_model_the_responses(random_tiny_model, tokenizer, records):
    config = SFTConfig(
        steps=20, batch_size=16, learning_rate=3e-3, warmup_steps=2, heldout_records=16, eval_every=20, seed=0
    )
    _, history = train_sft(copy.deepcopy(random_tiny_model), tokenizer, records, config, progress=False)
    _, heldout = history_series(history, "heldout_loss")
    assert heldout[-1] < heldout[0] - 1.0


def test_frozen_reference_is_a_frozen_identical_copy(base_model, tokenizer):
    policy = copy.deepcopy(base_model).train()
    reference = frozen_reference(policy)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    batch = sft_batch(tokenizer, PROMPTS, RESPONSES, padding_side="left")
    with torch.no_grad():
        policy_lp = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_mask)
        reference_lp = response_logprobs(reference, batch.input_ids, batch.attention_mask, batch.response_mask)
    assert torch.equal(policy_lp, reference_lp)  # KL(policy || reference) = 0 at the start of RLHF
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(reference.parameters()))  # a copy, not a view
