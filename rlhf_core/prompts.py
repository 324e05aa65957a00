"""The prompts every stage starts from: review openings from the offline world, or IMDB prefixes.

Offline (tiny, small): ``data/prompts/train.jsonl`` and ``data/prompts/eval.jsonl``, written by
``rlhf_core.pretrain.write_prompt_files`` from fixed seeds of ``rlhf_core.world``, one
``{"prompt": ...}`` per line, loaded with ``datasets``.

GPU (gpt2): the first words of IMDB reviews (``stanfordnlp/imdb`` on the hub), the classic
"continue this review" task of Ziegler et al. (2019). The eval split comes from IMDB's test set.
Every stage scores its policy on the same eval prompts, so their gold means compare. With
``RLHF_IMDB`` set, the reviews come from that local folder instead (``datasets.load_from_disk``:
a ``DatasetDict`` with ``train`` and ``test`` splits and a ``text`` column, as the hub's).

A profile with ``n_train_prompts`` (the quick one) uses only the first that many training prompts.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

from .config import GPT2_MODEL_VARIABLE, IMDB_VARIABLE, Profile, data_dir
from .errors import CourseError, HubUnreachableError

IMDB_DATASET = "stanfordnlp/imdb"


def load_prompts(profile: Profile, split: str = "train", n: int | None = None) -> list[str]:
    """The first ``n`` prompts of ``split`` ("train" or "eval") for the profile."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if profile.prompt_source == "world":
        prompts = _world_prompts(split)
    else:
        prompts = _imdb_prompts(split, os.environ.get(IMDB_VARIABLE) or None)
    if split == "train" and profile.n_train_prompts is not None:
        prompts = prompts[: profile.n_train_prompts]
    return list(prompts) if n is None else list(prompts[:n])


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


@lru_cache(maxsize=4)
def _imdb_prompts(split: str, local_folder: str | None) -> tuple[str, ...]:
    """IMDB review prefixes of ``split``, from the hub or from ``local_folder`` (``RLHF_IMDB``), shuffled
    once with a fixed seed (IMDB is sorted by label). Remembered: every stage asks for them."""
    imdb_split = "train" if split == "train" else "test"
    reviews = _local_imdb(local_folder, imdb_split) if local_folder else _hub_imdb(imdb_split)
    reviews = reviews.shuffle(seed=0)  # mix positive and negative
    return tuple(imdb_prefix(text) for text in reviews["text"])


def _hub_imdb(imdb_split: str):
    from datasets import load_dataset

    try:
        return load_dataset(IMDB_DATASET, split=imdb_split)
    except Exception as error:  # datasets raises several types for "no connection"
        raise HubUnreachableError(
            f"could not load {IMDB_DATASET} from the Hugging Face hub (offline, or the hub is unreachable): "
            f"run the 'tiny' profile (RLHF_PROFILE=tiny or --profile tiny), or point {IMDB_VARIABLE} at a local "
            f"copy (datasets' save_to_disk) and {GPT2_MODEL_VARIABLE} at a local gpt2 folder. "
            f"Original error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error


def _local_imdb(folder: str, imdb_split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        reviews = load_from_disk(folder)
    except (FileNotFoundError, ValueError) as error:
        raise CourseError(
            f"{IMDB_VARIABLE}={folder}: not a folder written by datasets' save_to_disk ({error}); "
            f"point it at a saved DatasetDict with train and test splits, or unset it"
        ) from error
    if not isinstance(reviews, DatasetDict) or imdb_split not in reviews:
        raise CourseError(
            f"{IMDB_VARIABLE}={folder}: it holds no '{imdb_split}' split; save a DatasetDict with "
            f"train and test splits (as load_dataset('{IMDB_DATASET}') gives)"
        )
    if "text" not in reviews[imdb_split].column_names:
        raise CourseError(
            f"{IMDB_VARIABLE}={folder}: its '{imdb_split}' split has no 'text' column "
            f"(columns: {', '.join(reviews[imdb_split].column_names)})"
        )
    return reviews[imdb_split]
