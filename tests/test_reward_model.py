"""The reward model: the surgery, the score read at the last real token whatever the padding, the
Bradley-Terry loss against its plain formula, a checkpoint any ``transformers`` user can load,
normalisation, and a short real training run that learns from noisy labels."""

import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2ForSequenceClassification

from rlhf_core import world
from rlhf_core.batching import last_token_index
from rlhf_core.gold import PreferenceLabeler, gold_score
from rlhf_core.models import count_parameters, load_causal_lm, load_reward_model, save_reward_model
from rlhf_core.preferences import split_preferences
from rlhf_core.reward_model import (
    RewardModelConfig,
    bradley_terry_loss,
    encode_for_scoring,
    fit_normalization,
    pairwise_accuracy,
    reward_model_from_policy,
    score_batch,
    score_texts,
    train_reward_model,
)
from rlhf_core.training import NonFiniteLossError

TOLERANCE = 1e-5  # float32


def _texts(n=8, seed=0):
    reviews = world.sample_reviews(n, seed)
    return [r.prompt for r in reviews], [r.response for r in reviews]


@pytest.fixture(scope="module")
def reward_model(random_tiny_model):
    torch.manual_seed(0)
    return reward_model_from_policy(random_tiny_model)


def test_surgery_replaces_the_lm_head_by_a_scalar_head(random_tiny_model, reward_model):
    d_model = random_tiny_model.config.n_embd
    assert isinstance(reward_model, GPT2ForSequenceClassification)
    assert reward_model.config.num_labels == 1
    assert reward_model.score.weight.shape == (1, d_model) and reward_model.score.bias is None
    # The backbone is the policy's, copied (not shared): training one must not move the other.
    for name, value in random_tiny_model.transformer.state_dict().items():
        assert torch.equal(value, reward_model.transformer.state_dict()[name])
    assert reward_model.transformer.wte.weight.data_ptr() != random_tiny_model.transformer.wte.weight.data_ptr()
    # The LM head (tied to the vocab embedding) is gone: parameters drop by nothing but gain d_model.
    assert count_parameters(reward_model) == count_parameters(random_tiny_model) + d_model
    # Head initialised N(0, 1 / sqrt(d_model + 1)) (Huang et al.): check the sample std loosely.
    assert reward_model.score.weight.std().item() == pytest.approx(1 / math.sqrt(d_model + 1), rel=0.3)


@pytest.mark.parametrize("ended", [True, False])
def test_score_is_the_same_left_right_and_alone(reward_model, any_tokenizer, ended):
    prompts, responses = _texts(8, seed=1)
    flags = [ended, not ended] * 4  # mix responses with and without EOS
    per_side = {}
    for side in ("left", "right"):
        batch = encode_for_scoring(any_tokenizer, prompts, responses, flags, padding_side=side)
        assert (batch.attention_mask == 0).any()  # there is padding to get wrong
        per_side[side] = score_batch(reward_model, batch.input_ids, batch.attention_mask).detach()
    alone = torch.cat(
        [
            score_batch(reward_model, *_alone(any_tokenizer, p, r, f)).detach()
            for p, r, f in zip(prompts, responses, flags)
        ]
    )
    assert (per_side["left"] - per_side["right"]).abs().max() < TOLERANCE
    assert (per_side["left"] - alone).abs().max() < TOLERANCE
    # score_texts (what later chapters call) agrees, in small and large batches
    for batch_size in (3, 64):
        texts = score_texts(reward_model, any_tokenizer, prompts, responses, batch_size, ended=flags)
        assert np.abs(texts - alone.numpy()).max() < TOLERANCE


def _alone(tokenizer, prompt, response, ended):
    batch = encode_for_scoring(tokenizer, [prompt], [response], [ended])
    return batch.input_ids, batch.attention_mask


def test_eos_is_appended_only_to_responses_that_ended(tokenizer):
    batch = encode_for_scoring(tokenizer, ["A film."] * 2, [" Great.", " Great."], [True, False])
    last = last_token_index(batch.attention_mask)
    assert batch.input_ids[0, last[0]].item() == tokenizer.eos_token_id
    assert batch.input_ids[1, last[1]].item() != tokenizer.eos_token_id
    assert last[0] == last[1] + 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_tokens_change_nothing_and_the_last_real_token_does(reward_model, any_tokenizer, side):
    prompts, responses = _texts(6, seed=2)
    batch = encode_for_scoring(any_tokenizer, prompts, responses, padding_side=side)
    scores = score_batch(reward_model, batch.input_ids, batch.attention_mask).detach()

    scrambled = batch.input_ids.clone()
    padding = batch.attention_mask == 0
    scrambled[padding] = torch.randint(
        2, len(any_tokenizer), (int(padding.sum()),), generator=torch.Generator().manual_seed(0)
    )
    scrambled_scores = score_batch(reward_model, scrambled, batch.attention_mask).detach()
    assert (scrambled_scores - scores).abs().max() < TOLERANCE

    rows = torch.arange(len(prompts))
    last = last_token_index(batch.attention_mask)
    changed = batch.input_ids.clone()
    changed[rows, last] = any_tokenizer.convert_tokens_to_ids("The")  # EOS -> another token
    changed_scores = score_batch(reward_model, changed, batch.attention_mask).detach()
    assert ((changed_scores - scores).abs() > 1e-3).all()


def test_pad_is_eos_trap_our_pooling_versus_pad_id_pooling(reward_model, tokenizer, tokenizer_pad_is_eos):
    """transformers' own pooling takes the rightmost token that is not the pad id. With pad != EOS
    and right padding that is the EOS, and it agrees with us; with pad == EOS (GPT-2) it skips the
    EOS and reads the token before it, so the reward is read at the wrong place."""
    prompts, responses = _texts(6, seed=3)
    ours_alone = {}
    for name, tok in (("pad_differs", tokenizer), ("pad_is_eos", tokenizer_pad_is_eos)):
        batch = encode_for_scoring(tok, prompts, responses, padding_side="right")
        ours = score_batch(reward_model, batch.input_ids, batch.attention_mask, normalize=False).detach()
        reward_model.config.pad_token_id = tok.pad_token_id  # what HF's forward looks for
        with torch.no_grad():
            theirs = reward_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        ours_alone[name] = ours
        if name == "pad_differs":
            assert (theirs - ours).abs().max() < TOLERANCE
        else:
            assert ((theirs - ours).abs() > 1e-3).all()  # every row read at the wrong token
            # ... namely at the token before EOS: what our pooling gives when EOS is removed
            cut = encode_for_scoring(tok, prompts, responses, ended=[False] * len(prompts))
            before_eos = score_batch(reward_model, cut.input_ids, cut.attention_mask, normalize=False).detach()
            assert (theirs - before_eos).abs().max() < TOLERANCE
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    # ours does not care which pad id the tokenizer uses
    assert (ours_alone["pad_differs"] - ours_alone["pad_is_eos"]).abs().max() < TOLERANCE


def test_bradley_terry_loss_against_the_plain_formula():
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(50, generator=generator) * 3, torch.randn(50, generator=generator) * 3
    plain = torch.mean(-torch.log(1 / (1 + torch.exp(-(chosen - rejected)))))
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(plain.item(), rel=1e-5)
    # equal scores: the model is indifferent, the loss is log 2
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    # a confidently wrong pair: the plain formula overflows to inf, logsigmoid gives the margin
    wrong = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-200.0))))
    assert wrong.item() == pytest.approx(200.0)
    # gradients push chosen up and rejected down
    c, r = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    bradley_terry_loss(c, r).backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def test_normalization_gives_mean_zero_std_one(random_tiny_model, tokenizer):
    torch.manual_seed(1)
    model = reward_model_from_policy(random_tiny_model)
    prompts, responses = _texts(40, seed=4)
    ended = [i % 5 != 0 for i in range(40)]
    raw = fit_normalization(model, tokenizer, prompts, responses, ended)
    scores = score_texts(model, tokenizer, prompts, responses, ended=ended)
    assert abs(scores.mean()) < 1e-4 and abs(scores.std() - 1) < 1e-4
    unnormalised = score_texts(model, tokenizer, prompts, responses, ended=ended, normalize=False)
    assert unnormalised.mean() == pytest.approx(raw["mean"], abs=1e-5)
    # the order of responses is untouched (gain > 0)
    assert (np.argsort(scores) == np.argsort(unnormalised)).all()


def test_checkpoint_loads_with_plain_auto_model_and_gives_the_same_raw_scores(random_tiny_model, tokenizer, tmp_path):
    torch.manual_seed(2)
    model = reward_model_from_policy(random_tiny_model)
    prompts, responses = _texts(8, seed=5)
    fit_normalization(model, tokenizer, prompts, responses)
    folder = save_reward_model(model, tmp_path / "rm", tokenizer, metrics={"note": "test"})
    assert (folder / "model.safetensors").exists() and (folder / "metrics.json").exists()

    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert isinstance(plain, GPT2ForSequenceClassification) and plain.config.num_labels == 1
    batch = encode_for_scoring(tokenizer, prompts, responses, padding_side="right")
    raw = score_batch(model, batch.input_ids, batch.attention_mask, normalize=False).detach()
    with torch.no_grad():
        # pad != EOS and right padding: transformers' own forward reads the same token as we do
        plain_forward = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
    assert (plain_forward - raw).abs().max() < TOLERANCE
    plain_scores = score_batch(plain, batch.input_ids, batch.attention_mask, normalize=False).detach()
    assert (plain_scores - raw).abs().max() < TOLERANCE

    loaded = load_reward_model(folder)
    assert loaded.config.reward_gain == pytest.approx(model.config.reward_gain)
    assert loaded.config.reward_bias == pytest.approx(model.config.reward_bias)
    normalised = score_batch(model, batch.input_ids, batch.attention_mask).detach()
    assert (score_batch(loaded, batch.input_ids, batch.attention_mask).detach() - normalised).abs().max() < TOLERANCE
    assert (normalised - (model.config.reward_gain * raw + model.config.reward_bias)).abs().max() < TOLERANCE


def _world_pairs(n_prompts, seed, labeler):
    """A keen and a harsh response (moods of opposite sign, random order) to each world prompt,
    labelled by ``labeler`` on gold: a clear signal, so a few dozen steps can learn it."""
    review_world = world.ReviewWorld(seed)
    rng = random.Random(seed)
    records = []
    for _ in range(n_prompts):
        prompt = review_world.prompt()
        moods = [rng.uniform(0.3, 1.0), rng.uniform(-1.0, -0.3)]
        rng.shuffle(moods)
        first, second = (review_world.response(mood) for mood in moods)
        if first == second:
            continue
        gold_first, gold_second = gold_score(prompt, first), gold_score(prompt, second)
        if labeler.prefers_first(gold_first, gold_second):
            chosen, rejected, chosen_gold, rejected_gold = first, second, gold_first, gold_second
        else:
            chosen, rejected, chosen_gold, rejected_gold = second, first, gold_second, gold_first
        records.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_gold": chosen_gold,
                "rejected_gold": rejected_gold,
            }
        )
    return records


def test_short_training_run_beats_chance_on_held_out_pairs(tiny_profile, tokenizer):
    """From the shipped base model, a few dozen steps on noisy labels of world reviews must rank
    held-out pairs (unseen prompts) better than chance, against the labels and the gold."""
    records = _world_pairs(600, seed=0, labeler=PreferenceLabeler(temperature=0.25, seed=0))
    train, heldout = split_preferences(records, 0.25, seed=0)
    torch.manual_seed(0)
    model = reward_model_from_policy(load_causal_lm(tiny_profile.base_model))
    config = RewardModelConfig(epochs=2, batch_size=16, learning_rate=2e-3, warmup_steps=3, eval_every=0)
    model, history = train_reward_model(model, tokenizer, train, heldout, config, progress=False)
    before, after = history[0], history[-1]
    assert after["step"] == 2 * math.ceil(len(train) / 16) and all(math.isfinite(h["loss"]) for h in history[1:])
    final = pairwise_accuracy(model, tokenizer, heldout)
    assert final["accuracy_labels"] == pytest.approx(after["heldout_accuracy_labels"])
    # Beat chance by a margin no coin could (n ~ 150 held-out pairs: chance has std ~0.04).
    assert before["heldout_accuracy_gold"] < 0.6  # it did not start out knowing
    assert final["accuracy_gold"] > 0.75
    assert final["accuracy_labels"] > 0.7
    assert final["loss"] < before["heldout_loss"]
    assert [row["lr"] for row in history[1:4]] == pytest.approx([2e-3 / 3, 2 * 2e-3 / 3, 2e-3])  # warmup in steps


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_interrupted_reward_model_training_resumes_bit_for_bit(tmp_path, random_tiny_model, tokenizer):
    records = _world_pairs(60, seed=5, labeler=PreferenceLabeler(temperature=0.25, seed=5))
    train, heldout = split_preferences(records, 0.2, seed=0)
    config = RewardModelConfig(
        epochs=2, batch_size=16, learning_rate=1e-3, warmup_steps=2, eval_every=3, checkpoint_every=2
    )  # 3 batches per epoch (the last one smaller): crosses an epoch
    assert config.total_steps(len(train)) == 6

    def fresh_model():
        torch.manual_seed(0)
        return reward_model_from_policy(random_tiny_model)

    seen = []
    uninterrupted, full_history = train_reward_model(
        fresh_model(), tokenizer, train, heldout, config, progress=False, callback=seen.append
    )
    assert seen == full_history[1:]
    _, partial_history = train_reward_model(
        fresh_model(), tokenizer, train, heldout, config, progress=False, out_dir=tmp_path, stop_after_steps=4
    )
    assert [row["step"] for row in partial_history] == [0, 1, 2, 3, 4]
    assert (tmp_path / "checkpoint" / "training_state.pt").exists()
    torch.manual_seed(12345)  # the disconnect scrambles the global random state
    resumed, history = train_reward_model(
        fresh_model(), tokenizer, train, heldout, config, progress=False, out_dir=tmp_path
    )
    assert history == full_history
    expected = _state(uninterrupted)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # a run with fixed steps, and a NaN named with the step
    short = RewardModelConfig(**{**config.__dict__, "steps": 2, "eval_every": 0})
    assert [
        row["step"] for row in train_reward_model(fresh_model(), tokenizer, train, heldout, short, progress=False)[1]
    ] == [0, 1, 2]
    broken = fresh_model()
    with torch.no_grad():
        broken.score.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="reward-model loss is nan at step 0"):
        train_reward_model(broken, tokenizer, train, [], short, progress=False)
