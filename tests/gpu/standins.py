"""Local stand-ins for the gpt2 profile's two hub downloads, built offline in seconds:

- ``build_gpt2_standin(folder, ...)``: a GPT-2 model and tokenizer folder for ``RLHF_GPT2_MODEL``,
  following the real ``gpt2``'s conventions: a byte-level BPE ``GPT2TokenizerFast`` whose only
  special token is ``<|endoftext|>`` (the last id, as 50256 is in GPT-2's vocabulary of 50257), used
  as BOS, EOS and unknown, and *no pad token* (the course sets pad = EOS and pads on the left for
  generation); a ``GPT2LMHeadModel`` of any shape (2 x 64 in CI, 12 x 768 like gpt2 on a GPU) with
  random weights, its ``config.json`` with no ``pad_token_id``, saved as safetensors.
- ``build_imdb_standin(folder, ...)``: a ``DatasetDict`` with ``train`` and ``test`` splits and
  ``text`` / ``label`` columns for ``RLHF_IMDB``, saved with ``save_to_disk``: reviews of the
  offline world dressed like IMDB's (HTML line breaks ``<br /><br />`` between sentences, sorted by
  label as IMDB is).

A random model almost never writes EOS (1 chance in the vocabulary size per token), where a
pretrained one ends its reviews. So that responses end on their own, the stand-in's final LayerNorm
bias is moved along EOS's embedding: every hidden state then leans toward EOS, whose probability
becomes about ``eos_probability`` per token. Everything else about the weights stays random.

Used by ``tests/test_gpt2_standin.py`` (CI) and ``tests/gpu/check_gpu_profile.py`` (by hand).
"""

from __future__ import annotations

import inspect
import json
import math
import random
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from rlhf_core import world

EOS_TOKEN = "<|endoftext|>"


def corpus(n_reviews: int = 3000, seed: int = 0) -> list[str]:
    """Review text to train the stand-in's BPE on: the offline world's reviews."""
    return [review.text for review in world.sample_reviews(n_reviews, seed=seed)]


def _byte_level_bpe(texts: list[str], vocab_size: int, seed: int) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a byte-level BPE with exactly ``vocab_size - 1`` tokens (EOS comes last).

    Trained on ``texts`` first; what training cannot fill (a small corpus has fewer merges than
    gpt2's 50k) is filled with merges of random pairs of tokens already there, so every id decodes
    to real bytes, as every id of gpt2 does."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size - 1, min_frequency=2, show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    tokens = sorted(vocab, key=vocab.get)
    rng = random.Random(seed)
    while len(vocab) < vocab_size - 1:
        first, second = rng.choice(tokens), rng.choice(tokens)
        merged = first + second
        if merged in vocab or len(merged) > 16:
            continue
        vocab[merged] = len(vocab)
        merges.append(f"{first} {second}")
        tokens.append(merged)
    return vocab, merges


def build_tokenizer(
    folder: str | Path, vocab_size: int, texts: list[str] | None = None, seed: int = 0
) -> GPT2TokenizerFast:
    """A GPT-2 tokenizer of ``vocab_size`` ids, ``<|endoftext|>`` the last, no pad token, saved in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_level_bpe(texts if texts is not None else corpus(seed=seed), vocab_size, seed)
    vocab[EOS_TOKEN] = len(vocab)
    special = {"unk_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "model_max_length": 1024}
    if "vocab" in inspect.signature(GPT2TokenizerFast.__init__).parameters:  # transformers 5
        tokenizer = GPT2TokenizerFast(vocab=vocab, merges=[tuple(merge.split(" ")) for merge in merges], **special)
    else:  # transformers 4 (a Colab image may have it) reads the two files gpt2 ships
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = GPT2TokenizerFast(
            vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), **special
        )
    if tokenizer.pad_token is not None or tokenizer.eos_token_id != vocab_size - 1 or len(tokenizer) != vocab_size:
        raise RuntimeError("the stand-in tokenizer does not follow gpt2's conventions")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_gpt2_standin(
    folder: str | Path,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 64,
    vocab_size: int = 1024,
    eos_probability: float = 0.06,
    seed: int = 0,
) -> Path:
    """A GPT-2 model and its tokenizer in ``folder`` (``save_pretrained``): see the module docstring."""
    folder = Path(folder)
    tokenizer = build_tokenizer(folder, vocab_size, seed=seed)
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )  # gpt2's: no pad_token_id
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # lean every hidden state toward EOS: logit(EOS) - logit(other) ~ log(p (V - 1) / (1 - p))
        eos_embedding = model.transformer.wte.weight[eos_id]  # (d,) also the LM head's EOS row (tied)
        lift = math.log(eos_probability * (vocab_size - 1) / (1 - eos_probability))
        model.transformer.ln_f.bias += lift * eos_embedding / eos_embedding.square().sum()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def build_imdb_standin(folder: str | Path, n_train: int = 200, n_test: int = 64, seed: int = 0) -> Path:
    """An IMDB-shaped ``DatasetDict`` (``train``, ``test``; ``text``, ``label``) in ``folder``."""
    from datasets import Dataset, DatasetDict

    def split(n: int, split_seed: int) -> Dataset:
        rows = []
        for review in world.sample_reviews(n, seed=split_seed):
            sentences = review.response.strip().split(". ")
            text = review.prompt + " " + ".<br /><br />".join(sentences)  # IMDB's HTML line breaks
            rows.append({"text": text, "label": int(review.mood > 0)})
        rows.sort(key=lambda row: row["label"])  # IMDB is sorted by label: prompts.py must shuffle
        return Dataset.from_list(rows)

    DatasetDict({"train": split(n_train, seed + 1), "test": split(n_test, seed + 2)}).save_to_disk(str(folder))
    return Path(folder)
