"""Padding never changes a log-prob; generation stops at EOS and its masks say what was sampled."""

import pytest
import torch

from rlhf_core import world
from rlhf_core.batching import encode_pairs, last_token_index, pack, position_ids_from_mask
from rlhf_core.generation import generate, sample_responses
from rlhf_core.logprobs import forward_logits, response_logprobs, sequence_logprobs
from rlhf_core.models import load_causal_lm

TOLERANCE = 1e-5  # float32


def _pairs(n=8, seed=0):
    reviews = world.sample_reviews(n, seed)
    return [r.prompt for r in reviews], [r.response for r in reviews]


def test_pack_left_and_right(tokenizer):
    batch = pack([[5, 6], [7]], [[8, 9, 0], [10]], pad_id=1, padding_side="left")
    assert batch.input_ids.tolist() == [[5, 6, 8, 9, 0], [1, 1, 1, 7, 10]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    right = pack([[5, 6], [7]], [[8, 9, 0], [10]], pad_id=1, padding_side="right")
    assert right.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert position_ids_from_mask(batch.attention_mask).tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    assert last_token_index(batch.attention_mask).tolist() == [4, 4]
    assert last_token_index(right.attention_mask).tolist() == [4, 1]


def test_encode_pairs_appends_eos_and_masks_the_prompt(any_tokenizer):
    prompts, responses = _pairs(4)
    batch = encode_pairs(any_tokenizer, prompts, responses)
    for row in range(4):
        response_ids = batch.input_ids[row][batch.response_mask[row].bool()].tolist()
        assert response_ids[-1] == any_tokenizer.eos_token_id
        assert any_tokenizer.decode(response_ids[:-1]) == responses[row]
        prompt_ids = batch.input_ids[row][(batch.attention_mask - batch.response_mask)[row].bool()].tolist()
        assert any_tokenizer.decode(prompt_ids) == prompts[row]


def test_logprobs_identical_left_right_and_alone(random_tiny_model, any_tokenizer):
    prompts, responses = _pairs(8, seed=1)
    per_side = {}
    for side in ("left", "right"):
        batch = encode_pairs(any_tokenizer, prompts, responses, padding_side=side)
        logprobs = response_logprobs(random_tiny_model, batch.input_ids, batch.attention_mask, batch.response_mask)
        assert torch.all(logprobs[batch.response_mask == 0] == 0)
        per_side[side] = [logprobs[row][batch.response_mask[row].bool()] for row in range(len(prompts))]
    for row in range(len(prompts)):
        alone = encode_pairs(any_tokenizer, prompts[row : row + 1], responses[row : row + 1])
        single = response_logprobs(random_tiny_model, alone.input_ids, alone.attention_mask, alone.response_mask)
        single = single[0][alone.response_mask[0].bool()]
        assert (per_side["left"][row] - per_side["right"][row]).abs().max() < TOLERANCE
        assert (per_side["left"][row] - single).abs().max() < TOLERANCE


def test_logprobs_against_a_plain_loop(random_tiny_model, tokenizer):
    prompts, responses = _pairs(2, seed=2)
    batch = encode_pairs(tokenizer, prompts, responses, padding_side="left")
    logprobs = response_logprobs(
        random_tiny_model, batch.input_ids, batch.attention_mask, batch.response_mask, temperature=0.7
    )
    logits = forward_logits(random_tiny_model, batch.input_ids, batch.attention_mask)
    for row in range(2):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[row, t]:
                expected = torch.log_softmax(logits[row, t - 1] / 0.7, -1)[batch.input_ids[row, t]]
                assert abs(logprobs[row, t] - expected) < TOLERANCE
    sums = sequence_logprobs(random_tiny_model, batch.input_ids, batch.attention_mask, batch.response_mask, 0.7)
    assert torch.allclose(sums, logprobs.sum(-1))


def test_greedy_generation_matches_a_full_forward_pass(random_tiny_model, any_tokenizer):
    """The cached decoding loop (left padding, growing mask) predicts what a fresh pass predicts."""
    prompts, _ = _pairs(6, seed=3)
    result = generate(random_tiny_model, any_tokenizer, prompts, max_new_tokens=12, temperature=0)
    logits = forward_logits(random_tiny_model, result.input_ids, result.attention_mask)
    predicted = logits.argmax(-1)  # (B, T): token predicted for column t + 1
    for row in range(len(prompts)):
        for t in torch.nonzero(result.response_mask[row]).flatten().tolist():
            assert result.input_ids[row, t] == predicted[row, t - 1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_a_fresh_forward_pass(tiny_profile, any_tokenizer, temperature):
    """The log-probs the sampler drew with are those a fresh pass over the finished, ragged batch
    gives at the same temperature, to 1e-5 in float32 (PPO takes them as log pi_theta_old)."""
    model = load_causal_lm(tiny_profile.base_model)  # it writes EOS: responses of many lengths
    prompts, _ = _pairs(8, seed=5)
    result = generate(model, any_tokenizer, prompts, 40, temperature, torch.Generator().manual_seed(3), "fp32")
    assert len(set(result.response_lengths.tolist())) > 1 and len(set(map(len, prompts))) > 1  # ragged
    fresh = response_logprobs(
        model, result.input_ids, result.attention_mask, result.response_mask, temperature=temperature
    )
    assert result.logprobs.dtype == torch.float32
    assert torch.all(result.logprobs[result.response_mask == 0] == 0)
    torch.testing.assert_close(result.logprobs, fresh, rtol=0, atol=1e-5)


def test_sampling_is_seeded(random_tiny_model, tokenizer):
    prompts, _ = _pairs(4, seed=4)
    first = sample_responses(random_tiny_model, tokenizer, prompts, 10, seed=5)
    again = sample_responses(random_tiny_model, tokenizer, prompts, 10, seed=5)
    other = sample_responses(random_tiny_model, tokenizer, prompts, 10, seed=6)
    assert first == again and first != other


class _ScriptedModel(torch.nn.Module):
    """A real module that always writes the same script of tokens: EOS handling made visible."""

    def __init__(self, vocab_size, scripts):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.scripts = vocab_size, scripts

    def forward(self, input_ids, attention_mask, position_ids, use_cache, cache=None):
        step = 0 if cache is None else cache + 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab_size), -1e9)
        for row, script in enumerate(self.scripts):
            logits[row, -1, script[min(step, len(script) - 1)]] = 0.0
        return {"logits": logits, "cache": step}


def test_generation_stops_at_eos_and_masks_what_follows(any_tokenizer):
    eos, word = any_tokenizer.eos_token_id, any_tokenizer.convert_tokens_to_ids("Ġgood")
    scripts = [[word, eos], [eos], [word, word, word, word, word]]  # ends, empty response, never ends
    model = _ScriptedModel(len(any_tokenizer), scripts)
    result = generate(model, any_tokenizer, ["A.", "B b.", "C c c."], max_new_tokens=4, temperature=0)
    assert result.ended.tolist() == [True, True, False]
    assert result.response_mask[:, result.prompt_width :].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert result.responses == [" good", "", " good good good good"]
    assert result.response_lengths.tolist() == [2, 1, 4]
    # after EOS: padding, never attended to (pad may equal EOS: only the masks tell)
    assert result.input_ids[0, result.prompt_width + 2 :].tolist() == [any_tokenizer.pad_token_id] * 2
    assert result.attention_mask[0, result.prompt_width + 2 :].tolist() == [0, 0]
    assert last_token_index(result.attention_mask).tolist()[0] == result.prompt_width + 1
