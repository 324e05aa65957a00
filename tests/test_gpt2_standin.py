"""The gpt2 profile end to end, offline, on local stand-ins for the hub's ``gpt2`` and IMDB.

``RLHF_GPT2_MODEL`` points at a 2-layer GPT-2 with gpt2's conventions (a byte-level BPE whose only
special token, ``<|endoftext|>``, is BOS, EOS and unknown; no pad token; the course pads with EOS,
on the left for generation), with a context of 56 tokens, so that prompts plus 48-token responses
and the demonstrations do not fit and must be cut. ``RLHF_IMDB`` points at an IMDB-shaped
``DatasetDict`` (``train``/``test``, ``text``, HTML line breaks, sorted by label).

``python -m rlhf_core run --profile gpt2 --quick --device cpu`` then runs every stage in a few
seconds: this is the gpt2 profile's code path (tokenizer handling, IMDB loading and prefixing,
truncation, the report) in CI. The stand-ins are built in ``tests/gpu/standins.py``, which the
GPU check uses too.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_core import dpo, sft
from rlhf_core.config import QUICK_EVAL_PROMPTS, QUICK_TRAIN_PROMPTS, REPO_DIR, get_profile
from rlhf_core.errors import CourseError, HubUnreachableError
from rlhf_core.generation import generate
from rlhf_core.logprobs import fit_to_context, sequence_logprobs
from rlhf_core.models import load_causal_lm
from rlhf_core.pipeline import STAGES, PipelineConfig, stage_file
from rlhf_core.prompts import imdb_prefix, load_prompts
from rlhf_core.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
from standins import build_gpt2_standin, build_imdb_standin  # noqa: E402

CONTEXT = 56  # the stand-in's n_positions: prompt (8-17 tokens) + 48 response tokens can exceed it
RUN_SECONDS = 900  # a hung run fails here; the speed itself is the bench's to measure, not a timed test's


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("standins")
    return {
        "model": build_gpt2_standin(folder / "gpt2", n_positions=CONTEXT),
        "imdb": build_imdb_standin(folder / "imdb"),
    }


@pytest.fixture
def standin_env(standins, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_GPT2_MODEL", str(standins["model"]))
    monkeypatch.setenv("RLHF_IMDB", str(standins["imdb"]))
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("RLHF_PROFILE", "RLHF_QUICK", "RLHF_PRECISION", "RLHF_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return standins


@pytest.fixture(scope="module")
def pipeline_run(standins, tmp_path_factory) -> dict:
    """``python -m rlhf_core run --profile gpt2 --quick`` in a subprocess, as a user types it."""
    folder = tmp_path_factory.mktemp("run")
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("RLHF_PROFILE", "RLHF_QUICK", "RLHF_PRECISION", "RLHF_DEVICE")
    }
    env.update(
        RLHF_GPT2_MODEL=str(standins["model"]),
        RLHF_IMDB=str(standins["imdb"]),
        RLHF_CACHE_DIR=str(folder / "cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_core",
            "run",
            "--profile",
            "gpt2",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(folder / "out"),
        ],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    return {
        "result": result,
        "seconds": time.perf_counter() - started,
        "out": folder / "out",
        "cache": folder / "cache" / "gpt2",
    }


def test_the_gpt2_profile_runs_end_to_end_on_the_stand_ins(pipeline_run):
    result = pipeline_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"gpt2 --quick on the stand-ins: {pipeline_run['seconds']:.0f} s")
    metrics = json.loads((pipeline_run["out"] / "metrics.json").read_text())
    assert (metrics["profile"], metrics["quick"], metrics["device"], metrics["precision"]) == (
        "gpt2",
        True,
        "cpu",
        "fp32",
    )
    assert metrics["eval_prompts"] == QUICK_EVAL_PROMPTS and metrics["max_new_tokens"] == 48
    assert all(stage in metrics for stage in STAGES)
    assert metrics["preferences"]["prompts"] <= QUICK_TRAIN_PROMPTS
    assert metrics["sft"]["steps"] == 24 and metrics["ppo"]["iterations"] == 4  # the quick configs
    assert metrics["best_of_n"]["n"] == 4 and metrics["best_of_n"]["kl_measured"] is not None
    for stage in ("base", "sft", "ppo", "dpo", "best_of_n"):
        assert 0.0 < metrics[stage]["eos_fraction"] <= 1.0  # responses end on their own, at EOS
    report = (pipeline_run["out"] / "report.md").read_text()
    assert report.startswith("# RLHF pipeline: gpt2 profile") and "| best-of-4 |" in report
    assert "16 held-out prompts" in report
    assert "<|endoftext|>" not in report  # pad == EOS: no padding or EOS leaks into a response's text
    assert (pipeline_run["cache"] / "pipeline-quick").is_dir()  # apart from a full gpt2 run's measurements


def test_the_run_had_to_cut_to_the_context(standin_env, pipeline_run):
    """The demonstrations SFT trained on, and the longest samples, did not fit the stand-in's context."""
    tokenizer = load_tokenizer(get_profile("gpt2").tokenizer)
    (demonstrations,) = pipeline_run["cache"].glob("demonstrations-*/demonstrations.jsonl")
    records = [json.loads(line) for line in demonstrations.read_text().splitlines()]
    lengths = [len(tokenizer(r["prompt"] + r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in records]
    assert max(lengths) > CONTEXT  # SFT ran on them: they were cut (sft.fit_responses)
    (pairs,) = pipeline_run["cache"].glob("preferences-*/preferences.jsonl")
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert all("<|endoftext|>" not in r["chosen"] + r["rejected"] for r in records)
    ended = [r["chosen_ended"] for r in records] + [r["rejected_ended"] for r in records]
    assert any(ended) and not all(ended)  # some responses ended at EOS, others at the length or context limit


def test_the_prompts_are_imdb_prefixes_of_the_local_copy(standin_env, pipeline_run):
    from datasets import load_from_disk

    profile = get_profile("gpt2", quick=True)
    test_reviews = load_from_disk(str(standin_env["imdb"]))["test"].shuffle(seed=0)["text"]
    eval_prompts = load_prompts(profile, "eval", profile.n_eval_prompts)
    assert eval_prompts == [imdb_prefix(text) for text in test_reviews[:QUICK_EVAL_PROMPTS]]
    assert all("<br" not in prompt and len(prompt.split()) <= 8 for prompt in eval_prompts)
    assert len(load_prompts(profile, "train")) == QUICK_TRAIN_PROMPTS
    labels = load_from_disk(str(standin_env["imdb"]))["train"].shuffle(seed=0)["label"][:20]
    assert 0 < sum(labels) < 20  # shuffled: the sorted-by-label file gives both kinds of review first
    report = (pipeline_run["out"] / "report.md").read_text()
    assert f"**{eval_prompts[0]}**" in report  # the report's examples are these very prompts


def test_the_profile_takes_the_stand_in_model_and_its_shape(standin_env):
    profile = get_profile("gpt2")
    assert profile.base_model == profile.tokenizer == str(standin_env["model"])
    assert (profile.n_layer, profile.n_embd, profile.n_positions, profile.vocab_size) == (2, 64, CONTEXT, 1024)
    assert not profile.quick and profile.n_train_prompts is None
    quick = get_profile("gpt2", quick=True)
    assert quick.quick and quick.n_eval_prompts == QUICK_EVAL_PROMPTS
    assert sft.SFTConfig.for_profile(quick) != sft.SFTConfig.for_profile(profile)  # so their cache keys differ
    assert PipelineConfig.for_profile(quick).best_of_n == 4
    assert stage_file(quick, "sft") != stage_file(profile, "sft")
    config = json.loads((standin_env["model"] / "config.json").read_text())
    assert config.get("pad_token_id") is None and config["eos_token_id"] == 1023  # gpt2's: EOS last, no pad


def test_the_tokenizer_has_no_pad_and_generation_pads_left_with_eos(standin_env):
    profile = get_profile("gpt2")
    saved = json.loads((standin_env["model"] / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") is None and saved["eos_token"] == "<|endoftext|>"
    tokenizer = load_tokenizer(profile.tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1023  # what the course sets for gpt2
    model = load_causal_lm(profile.base_model)
    prompts = load_prompts(profile, "eval", 32)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    assert len(set(lengths)) > 1  # the batch needs padding
    batch = generate(model, tokenizer, prompts, 48, generator=torch.Generator().manual_seed(0))
    eos = tokenizer.eos_token_id
    assert bool(batch.ended.any())
    for row, length in enumerate(lengths):
        padding = batch.prompt_width - length  # left padding: the prompt ends in the last prompt column
        assert batch.attention_mask[row, :padding].sum() == 0 and batch.attention_mask[row, padding:].any()
        assert batch.attention_mask[row, padding : batch.prompt_width].all()
        response = batch.input_ids[row][batch.response_mask[row].bool()]
        if batch.ended[row]:  # the EOS is the response's last real token; what follows is padding
            assert response[-1] == eos and (response[:-1] != eos).all()
            last = int(batch.attention_mask[row].nonzero().max())
            assert batch.input_ids[row, last] == eos and batch.attention_mask[row, last + 1 :].sum() == 0
        assert "<|endoftext|>" not in batch.responses[row]
    # greedy, alone or in the padded batch: the same response
    greedy = generate(model, tokenizer, prompts[:8], 12, temperature=0)
    for row in range(8):
        assert (
            generate(model, tokenizer, prompts[row : row + 1], 12, temperature=0).responses[0] == greedy.responses[row]
        )


def test_sequences_are_cut_to_the_model_context(standin_env):
    profile = get_profile("gpt2")
    tokenizer = load_tokenizer(profile.tokenizer)
    model = load_causal_lm(profile.base_model)
    long_prompt = " ".join(load_prompts(profile, "train", 4))  # ~40 tokens: little room left for a response
    prompt_length = len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    assert CONTEXT - 48 < prompt_length < CONTEXT
    batch = generate(model, tokenizer, [long_prompt, "The film"], 48, generator=torch.Generator().manual_seed(1))
    assert int(batch.attention_mask.sum(-1).max()) <= CONTEXT
    assert int(batch.response_lengths[0]) <= CONTEXT - prompt_length
    with pytest.raises(CourseError, match="n_positions"):
        generate(model, tokenizer, [" ".join([long_prompt] * 2)], 8)

    # SFT: a demonstration too long for the context is cut, its EOS kept
    prompt_ids = [[1] * 20]
    cut = sft.fit_responses(prompt_ids, [list(range(100, 160)) + [1023]], CONTEXT)[0]
    assert len(cut) == CONTEXT - 20 and cut[-1] == 1023 and cut[:-1] == list(range(100, 100 + CONTEXT - 21))

    # DPO: a pair longer than the context is scored on its first CONTEXT tokens, for any padding
    record = {
        "prompt": long_prompt,
        "chosen": " " + long_prompt,
        "rejected": " The film was good.",
        "chosen_ended": True,
        "rejected_ended": True,
    }
    with torch.no_grad():
        chosen, rejected = dpo.pair_logps(model, tokenizer, [record])
        left_chosen, _ = dpo.pair_logps(model, tokenizer, [record], padding_side="left")
        full = dpo.encode_preference_batch(tokenizer, [record])
        assert full.input_ids.shape[1] > CONTEXT
        first = fit_to_context(full, CONTEXT)
        assert first.input_ids.shape[1] == CONTEXT and int(first.attention_mask.sum(-1).max()) == CONTEXT
        expected = sequence_logprobs(
            model, full.input_ids[:1, :CONTEXT], full.attention_mask[:1, :CONTEXT], full.response_mask[:1, :CONTEXT]
        )
    assert torch.allclose(chosen, expected, atol=1e-5) and torch.allclose(left_chosen, chosen, atol=1e-4)
    assert torch.isfinite(rejected).all()


def test_quick_comes_from_the_argument_or_the_variable(monkeypatch):
    monkeypatch.setenv("RLHF_QUICK", "1")
    assert get_profile("tiny").quick and get_profile("tiny").n_train_prompts == QUICK_TRAIN_PROMPTS
    assert not get_profile("tiny", quick=False).quick  # the argument wins
    monkeypatch.setenv("RLHF_QUICK", "0")
    assert not get_profile("tiny").quick and get_profile("tiny", quick=True).quick


def test_without_the_hub_the_errors_name_the_tiny_profile_and_the_stand_ins(tmp_path, monkeypatch):
    for name in ("RLHF_IMDB", "RLHF_GPT2_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(HubUnreachableError) as error:  # conftest switches the hub off
        load_prompts(get_profile("gpt2"), "eval")
    message = str(error.value)
    assert "\n" not in message and "'tiny' profile" in message
    assert "RLHF_IMDB" in message and "RLHF_GPT2_MODEL" in message
    monkeypatch.setenv("RLHF_IMDB", str(tmp_path))
    with pytest.raises(CourseError, match=f"RLHF_IMDB={tmp_path}: not a folder written by datasets' save_to_disk"):
        load_prompts(get_profile("gpt2"), "train")
    monkeypatch.setenv("RLHF_GPT2_MODEL", str(tmp_path))
    with pytest.raises(CourseError, match=f"RLHF_GPT2_MODEL={tmp_path}: no config.json there"):
        get_profile("gpt2")
    assert get_profile("tiny").name == "tiny"  # another profile never reads it
