"""The course's tokenizer: GPT-2-style byte-level BPE trained on the offline world's reviews.

GPT-2 reads text as bytes merged into subwords by byte-pair encoding (Sennrich et al., 2016;
Radford et al., 2019). The offline world trains the same kind of tokenizer with the `tokenizers`
library on its own review text (vocabulary ~2k), saves it to ``data/tokenizer`` and loads it back
as a ``transformers`` fast tokenizer with ``AutoTokenizer.from_pretrained`` like any hub tokenizer.

It has an EOS token that ends every review *and a separate pad token*. Padding with EOS (what
GPT-2 does, having no pad token) is a classic source of bugs: code that finds "the last real
token" by looking for pad ids then reads the reward at the wrong place. The whole package finds
real tokens through attention masks only, and the tests run both ways (pad != EOS here, pad ==
EOS in the gpt2 profile).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .models import pretrained_error

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


# The class ``tokenizer_config.json`` names. transformers 5 writes its own new ``TokenizersBackend``, which
# transformers 4.x (still on many Colab images, and TRL 0.24's environment) cannot load; both lines load
# ``PreTrainedTokenizerFast`` into the same tokenizer (the same ids, the same special tokens).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """``save_pretrained``; where transformers 5 named its ``TokenizersBackend``, ``TOKENIZER_CLASS``
    instead, so that transformers 4.x and 5.x both load the folder (hub classes are kept)."""
    tokenizer.save_pretrained(str(folder))
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = TOKENIZER_CLASS
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; EOS gets id 0 and pad id 1."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1024,
    )


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """A hub name or a local folder, through ``AutoTokenizer.from_pretrained``.

    Tokenizers without a pad token (the real GPT-2) get pad = EOS; everything downstream uses the
    attention mask, never pad ids, to tell real tokens from padding.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as error:
        raise pretrained_error(str(name_or_path), "tokenizer", error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
