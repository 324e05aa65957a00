"""A few training steps of every trainer on tiny data, for ``tests/test_distributed.py``.

    python tests/distributed_script.py OUT                                          one process
    accelerate launch --cpu --num_processes 2 tests/distributed_script.py OUT      two

Each process writes ``OUT/process-<i>.json``: a digest of every trained model's parameters, the
SFT, reward-model and DPO histories (loss trajectories), the PPO and critic-free histories, the first
responses each process sampled, and a PPO run interrupted after one iteration and resumed.
The global batches are the same whatever the number of processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlhf_core import distributed, launch  # noqa: E402

if __name__ == "__main__" and (status := launch.relaunch_cpu_processes()) is not None:
    sys.exit(status)  # accelerate launch --cpu: the processes it meant to start have run

from rlhf_core.config import get_profile, seed_everything  # noqa: E402
from rlhf_core.demonstrations import DemonstratorConfig, write_demonstrations  # noqa: E402
from rlhf_core.dpo import DPOConfig, train_dpo  # noqa: E402
from rlhf_core.grpo import CriticFreeConfig  # noqa: E402
from rlhf_core.grpo_trainer import CriticFreeTrainer  # noqa: E402
from rlhf_core.models import load_causal_lm  # noqa: E402
from rlhf_core.prompts import load_prompts  # noqa: E402
from rlhf_core.reward_model import RewardModelConfig, reward_model_from_policy, score_batch, train_reward_model  # noqa: E402
from rlhf_core.rlhf import PPOConfig, ValueModel  # noqa: E402
from rlhf_core.rlhf_trainer import PPOTrainer  # noqa: E402
from rlhf_core.sft import SFTConfig, frozen_reference, train_sft  # noqa: E402
from rlhf_core.tokenizer import load_tokenizer  # noqa: E402

# Global batches of 7 split 4 + 3 over two processes: the losses must be normalised by the global count.
SFT = SFTConfig(steps=5, batch_size=7, warmup_steps=1, heldout_records=10, eval_every=2, checkpoint_every=0)
REWARD = RewardModelConfig(steps=5, batch_size=7, warmup_steps=1, eval_every=2, checkpoint_every=0, score_batch_size=4)
DPO = DPOConfig(steps=5, batch_size=7, warmup_steps=1, eval_every=2, eval_batch_size=4, checkpoint_every=0)
PPO = PPOConfig(
    iterations=2,
    prompts_per_iteration=8,
    minibatch_size=4,
    ppo_epochs=2,
    max_new_tokens=16,
    adaptive_kl=True,
    kl_target=0.5,
    sample_every=1,
    checkpoint_every=1,
)
CRITIC_FREE = CriticFreeConfig(
    iterations=2, prompts_per_iteration=4, group_size=2, minibatch_size=4, ppo_epochs=2, max_new_tokens=16
)


def digest(model) -> str:
    """A hash of every parameter's bytes: equal digests, equal weights, bit for bit."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def preference_pairs(prompts: list[str]) -> list[dict]:
    """Two demonstrations of each prompt, the one with the higher gold chosen."""
    first = write_demonstrations(prompts, DemonstratorConfig(), seed=1)
    second = write_demonstrations(prompts, DemonstratorConfig(), seed=2)
    pairs = []
    for a, b in zip(first, second):
        if a["response"] == b["response"]:
            continue
        chosen, rejected = (a, b) if a["gold"] >= b["gold"] else (b, a)
        pairs.append(
            {
                "prompt": a["prompt"],
                "chosen": chosen["response"],
                "rejected": rejected["response"],
                "chosen_gold": chosen["gold"],
                "rejected_gold": rejected["gold"],
            }
        )
    return pairs


def ppo_trainer(base, reward_model, tokenizer, prompts) -> PPOTrainer:
    value_model = ValueModel.from_reward_model(reward_model)
    return PPOTrainer(
        copy.deepcopy(base), frozen_reference(base), reward_model, value_model, tokenizer, prompts, PPO, score_batch
    )


def main(out: Path) -> None:
    profile = get_profile("tiny")
    tokenizer = load_tokenizer(profile.tokenizer)
    base = load_causal_lm(profile.base_model, device="cpu")
    prompts = load_prompts(profile, "train", 60)
    demonstrations = write_demonstrations(prompts[:40], DemonstratorConfig(), seed=0)
    pairs = preference_pairs(prompts[:40])
    train_pairs, heldout_pairs = pairs[:-8], pairs[-8:]
    result = {"process": distributed.process_index(), "processes": distributed.num_processes()}
    digests, histories = {}, {}

    seed_everything(0)
    sft, histories["sft"] = train_sft(copy.deepcopy(base), tokenizer, demonstrations, SFT, progress=False)
    digests["sft"] = digest(sft)

    seed_everything(0)
    reward_model = reward_model_from_policy(base)
    reward_model, histories["reward_model"] = train_reward_model(
        reward_model, tokenizer, train_pairs, heldout_pairs, REWARD, progress=False
    )
    digests["reward_model"] = digest(reward_model)
    reward_model.requires_grad_(False)

    dpo, histories["dpo"] = train_dpo(
        copy.deepcopy(base), frozen_reference(base), tokenizer, train_pairs, heldout_pairs, DPO, progress=False
    )
    digests["dpo"] = digest(dpo)

    trainer = ppo_trainer(base, reward_model, tokenizer, prompts)
    histories["ppo"] = trainer.train(progress=False)
    digests["ppo"] = digest(trainer.policy)
    digests["ppo_value_model"] = digest(trainer.value_model)
    result["ppo_first_responses"] = [sample["response"] for sample in trainer.samples]

    # the same run, interrupted after one iteration and resumed from its checkpoint
    checkpoint = out / "ppo-checkpoint"
    ppo_trainer(base, reward_model, tokenizer, prompts).train(
        checkpoint_dir=checkpoint, progress=False, stop_after_iterations=1
    )
    resumed = ppo_trainer(base, reward_model, tokenizer, prompts)
    resumed.train(checkpoint_dir=checkpoint, progress=False)
    digests["ppo_resumed"] = digest(resumed.policy)

    critic_free = CriticFreeTrainer(
        copy.deepcopy(base), frozen_reference(base), reward_model, tokenizer, prompts, CRITIC_FREE, score_batch
    )
    histories["critic_free"] = critic_free.train(progress=False)
    digests["critic_free"] = digest(critic_free.policy)
    result["critic_free_first_responses"] = [sample["response"] for sample in critic_free.samples]

    result.update(digests=digests, histories=histories)
    (out / f"process-{distributed.process_index()}.json").write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    main(folder)
