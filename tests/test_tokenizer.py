import json
from pathlib import Path

from transformers import AutoTokenizer

from rlhf_core import world
from rlhf_core.tokenizer import EOS_TOKEN, PAD_TOKEN, TOKENIZER_CLASS, save_tokenizer, train_tokenizer


def test_shipped_tokenizer_loads_with_autotokenizer(tiny_profile):
    tokenizer = AutoTokenizer.from_pretrained(tiny_profile.tokenizer)
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert 500 < len(tokenizer) <= tiny_profile.vocab_size


def test_round_trip_on_world_text_and_unseen_text(tokenizer):
    for review in world.sample_reviews(100, seed=11):
        ids = tokenizer(review.text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == review.text
    odd = "Zyx qwop, café ünïcödé 42!"  # byte-level BPE encodes anything
    assert tokenizer.decode(tokenizer(odd)["input_ids"]) == odd


def test_bpe_learned_merges_for_invented_names(tokenizer):
    # whole words of the world become single tokens: BPE really merged bytes
    assert len(tokenizer.tokenize(" Quellmoor")) <= 2
    assert len(tokenizer(" The acting was wonderful.")["input_ids"]) == 5


def test_training_a_tokenizer_from_text():
    tokenizer = train_tokenizer(world.pretraining_corpus(300, seed=0), vocab_size=400)
    assert len(tokenizer) <= 400 and tokenizer.pad_token_id == 1 and tokenizer.eos_token_id == 0
    text = world.sample_reviews(1, seed=3)[0].text
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_saved_tokenizers_name_a_class_transformers_4_and_5_both_load(tiny_profile, tmp_path):
    # transformers 5's save_pretrained writes "TokenizersBackend", unknown to transformers 4.x
    # (AutoTokenizer raises "Tokenizer class TokenizersBackend does not exist").
    tokenizer = train_tokenizer(world.pretraining_corpus(300, seed=0), vocab_size=400)
    save_tokenizer(tokenizer, tmp_path)
    for folder in (tmp_path, tiny_profile.tokenizer):
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == TOKENIZER_CLASS == "PreTrainedTokenizerFast"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "The acting was wonderful.<|endoftext|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (0, 1)
