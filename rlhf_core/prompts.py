"""The prompts every stage starts from: review openings from the offline world, or IMDB prefixes.

Offline (tiny, small): ``data/prompts/train.jsonl`` and ``data/prompts/eval.jsonl``, written by
``rlhf_core.pretrain.write_prompt_files`` from fixed seeds of ``rlhf_core.world``, one
``{"prompt": ...}`` per line, loaded with ``datasets``.

GPU (gpt2): the first words of IMDB reviews (``stanfordnlp/imdb`` on the hub), the classic
"continue this review" task of Ziegler et al. (2019). The eval split comes from IMDB's test set.
Every stage scores its policy on the same eval prompts, so their gold means compare.
"""

from __future__ import annotations

import re

from .config import Profile, data_dir

IMDB_DATASET = "stanfordnlp/imdb"


def load_prompts(profile: Profile, split: str = "train", n: int | None = None) -> list[str]:
    """The first ``n`` prompts of ``split`` ("train" or "eval") for the profile."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    prompts = _world_prompts(split) if profile.prompt_source == "world" else _imdb_prompts(split)
    return prompts if n is None else prompts[:n]


def _world_prompts(split: str) -> list[str]:
    from datasets import load_dataset

    path = data_dir() / "prompts" / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no prompt file {path}: write it with `python -m rlhf_core pretrain --profile tiny`")
    return list(load_dataset("json", data_files=str(path), split="train")["prompt"])


def imdb_prefix(review: str, max_words: int = 8) -> str:
    """The opening words of a review, HTML line breaks removed: "I rented this movie because"."""
    words = re.sub(r"<br\s*/?>", " ", review).split()
    return " ".join(words[:max_words])


def _imdb_prompts(split: str) -> list[str]:
    from datasets import load_dataset

    try:
        reviews = load_dataset(IMDB_DATASET, split="train" if split == "train" else "test")
    except Exception as error:  # datasets raises several types for "no connection"
        raise OSError(
            f"could not load {IMDB_DATASET} from the Hugging Face hub (offline, or the hub is "
            f"unreachable). The course runs without the hub in the 'tiny' profile: set "
            f"RLHF_PROFILE=tiny or pass --profile tiny. Original error: {error}") from error
    reviews = reviews.shuffle(seed=0)  # IMDB is sorted by label; mix positive and negative
    return [imdb_prefix(text) for text in reviews["text"]]
