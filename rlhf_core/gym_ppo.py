"""PPO from scratch on a gymnasium task: the agent of chapter 00 (the PPO recap).

A single-file, cleanrl-style PPO for discrete-action environments (CartPole-v1 in CI, LunarLander-v3
in full mode), meant to be read top to bottom. The math (GAE, the clipped policy and value losses,
advantage normalisation, approx-KL, explained variance) is *not* written here: it is imported from
``rlhf_core.ppo``, the very functions the language-model PPO loop of chapters 04-06 uses. Only the
plumbing around them is gym-specific: vectorised environments, an actor-critic MLP, the rollout
buffer and the minibatch epochs. Using the trained agent (evaluating, recording, animating an
episode) is ``rlhf_core.gym_episodes``.

The rollout buffer is laid out (B, T) = (environments, steps), the same layout as a batch of
language-model responses (responses, tokens): each row is one stream of experience, and
``rlhf_core.ppo.gae`` walks it backwards in time.

Implementation details follow S. Huang et al., "The 37 Implementation Details of Proximal Policy
Optimization" (ICLR Blog Track 2022; "detail N" below is its numbering) and cleanrl's ``ppo.py``
(S. Huang et al., "CleanRL: High-quality Single-file Implementations of Deep Reinforcement Learning
Algorithms", JMLR 2022); each is named in a comment where it happens. The CartPole preset follows
the rl-baselines3-zoo hyperparameters (A. Raffin, 2020), which are tuned for few environment steps.
The algorithm is J. Schulman et al., "Proximal Policy Optimization Algorithms" (2017), with GAE from
Schulman et al. (2016).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import ppo
from .config import seed_everything

__all__ = [
    "GymPPOConfig",
    "Agent",
    "TrainHistory",
    "make_envs",
    "train",
]


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class GymPPOConfig:
    """Every knob of the gym PPO agent. Start from a preset: ``GymPPOConfig.cartpole()``."""

    env_id: str = "CartPole-v1"  # gymnasium environment id; the action space must be discrete
    seed: int = 1  # seeds Python, NumPy, torch and the environments: a run is reproducible
    total_timesteps: int = 100_000  # environment steps, summed over all parallel environments
    num_envs: int = 8  # parallel environments (B): more decorrelated data per update
    num_steps: int = 32  # steps per environment per rollout (T): one update sees B * T steps
    learning_rate: float = 1e-3  # Adam step size at the start of training
    anneal_lr: bool = True  # decay the learning rate linearly to 0 over training (detail 4)
    gamma: float = 0.98  # discount factor
    gae_lambda: float = 0.8  # GAE's lambda: 0 = one-step TD (low variance), 1 = Monte Carlo
    num_minibatches: int = 1  # minibatches per epoch; minibatch size = B * T / num_minibatches
    update_epochs: int = 20  # passes over each rollout; the clipping keeps these safe
    norm_adv: bool = True  # whiten advantages per minibatch (detail 7)
    clip_coef: float = 0.2  # epsilon of the clipped surrogate: the trust region [1 - eps, 1 + eps]
    clip_vloss: bool = False  # clip the value loss around the rollout's values (detail 9)
    vf_clip_coef: float = 0.2  # epsilon of the value clipping, when clip_vloss is on
    ent_coef: float = 0.0  # weight of the entropy bonus (detail 10): more keeps exploring longer
    vf_coef: float = 0.5  # weight of the value loss in the shared loss
    max_grad_norm: float = 0.5  # global gradient-norm clipping (detail 11)
    target_kl: float | None = None  # stop an update's epochs early once approx-KL exceeds this
    hidden_size: int = 64  # width of both hidden layers of the actor and of the critic
    bootstrap_truncation: bool = True  # on time-limit truncation add gamma * V(final obs) to the reward
    stop_at_return: float | None = None  # stop early once the recent mean return reaches this
    return_window: int = 20  # how many recent episodes the "mean return" averages over
    torch_threads: int | None = 1  # torch CPU threads during training (1 is fastest for tiny MLPs)
    device: str = "cpu"  # tiny MLPs and batches of 8 observations run faster on CPU than on a GPU
    progress_bar: bool = True  # show a tqdm bar over environment steps

    def __post_init__(self):
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps = {self.batch_size} must split into {self.num_minibatches} equal minibatches"
            )

    @property
    def batch_size(self) -> int:
        """Environment steps per rollout, B * T."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        """Rollout-then-learn iterations that fit in ``total_timesteps``."""
        return self.total_timesteps // self.batch_size

    @classmethod
    def cartpole(cls, **overrides) -> GymPPOConfig:
        """CartPole-v1 (max return 500), tuned for wall time on a 2-core CPU.

        rl-baselines3-zoo's settings (8 short rollouts of 32 steps, one minibatch of 256 seen
        20 times, lr 1e-3 annealed, gamma 0.98, lambda 0.8, no entropy bonus) with 70% of its step
        budget: the faster learning-rate decay settles the policy sooner. Training stops once the
        last 20 episodes average 450 or more; seeds 1-8 got there after 23k-53k steps (seed 1:
        50k), and every stopped agent then scored 500 in each of 10 greedy evaluation episodes.
        """
        preset = cls(
            env_id="CartPole-v1",
            total_timesteps=70_000,
            num_envs=8,
            num_steps=32,
            learning_rate=1e-3,
            gamma=0.98,
            gae_lambda=0.8,
            num_minibatches=1,
            update_epochs=20,
            ent_coef=0.0,
            stop_at_return=450.0,
        )
        return replace(preset, **overrides)

    @classmethod
    def lunar_lander(cls, **overrides) -> GymPPOConfig:
        """LunarLander-v3 (solved at an average return of 200), the full-mode task.

        16 environments x 128 steps, 8 minibatches of 256 seen 10 times, lr 1e-3 annealed over 1M
        steps, a long horizon (gamma 0.999, lambda 0.98: the landing bonus comes late) and a small
        entropy bonus. Seeds 1-5 reached a mean of 200 over the last 20 episodes after 96k, 184k,
        625k, 199k and 391k steps; training stops there.
        """
        preset = cls(
            env_id="LunarLander-v3",
            total_timesteps=1_000_000,
            num_envs=16,
            num_steps=128,
            learning_rate=1e-3,
            gamma=0.999,
            gae_lambda=0.98,
            num_minibatches=8,
            update_epochs=10,
            ent_coef=0.01,
            stop_at_return=200.0,
        )
        return replace(preset, **overrides)


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------


def make_envs(env_id: str, num_envs: int, seed: int) -> gym.vector.VectorEnv:
    """``num_envs`` copies of the environment stepped in lock-step (detail 1: vectorised envs).

    SyncVectorEnv steps them one after another in this process, which for cheap environments beats
    subprocesses. SAME_STEP autoreset: when an episode ends, ``step`` already returns the first
    observation of the next episode and puts the last one in ``info["final_obs"]``, so every step of
    the rollout is a real transition.
    """
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        raise ValueError(f"{env_id} has a continuous action space; this agent handles discrete actions")
    envs.action_space.seed(seed)
    return envs


# ---------------------------------------------------------------------------------------------
# Agent
# ---------------------------------------------------------------------------------------------


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain ``std`` and zero biases (detail 2)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Actor-critic with separate MLPs (detail 13): the policy pi(a | s) and the value V(s).

    The policy's last layer starts with tiny weights (gain 0.01) so that every action starts
    equally likely; the value's with gain 1.
    """

    def __init__(self, obs_dim: int, n_actions: int, hidden_size: int = 64):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, n_actions), std=0.01),
        )

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (N, obs_dim) -> V(s) (N,)."""
        return self.critic(obs).squeeze(-1)

    def get_action_and_value(
        self, obs: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample an action (or score a given one): (action, log pi(a|s), entropy, V(s)), each (N,)."""
        logits = self.actor(obs)  # (N, n_actions)
        log_probs = torch.log_softmax(logits, dim=-1)  # (N, n_actions)
        if action is None:
            action = torch.multinomial(log_probs.exp(), num_samples=1).squeeze(-1)  # (N,)
        logprob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)  # (N,)
        return action, logprob, ppo.entropy_from_logits(logits), self.get_value(obs)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, greedy: bool = True) -> torch.Tensor:
        """obs (N, obs_dim) -> actions (N,): the most likely action, or a sample."""
        logits = self.actor(obs)
        if greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainHistory:
    """What happened during training."""

    config: dict  # the GymPPOConfig as a dict
    updates: list[dict] = field(default_factory=list)  # one row per update (see ``train``)
    episode_returns: list[float] = field(default_factory=list)  # every finished episode, in order
    episode_end_steps: list[int] = field(default_factory=list)  # global step at which each ended

    def mean_recent_return(self, window: int | None = None) -> float:
        """Mean return of the last ``window`` finished episodes (NaN before the first one)."""
        window = window or self.config["return_window"]
        recent = self.episode_returns[-window:]
        return float(np.mean(recent)) if recent else float("nan")


def train(config: GymPPOConfig, callback: Callable[[TrainHistory], None] | None = None) -> tuple[Agent, TrainHistory]:
    """Train a PPO agent; returns ``(agent, history)``.

    ``history.updates`` holds one dict per update with: ``update``, ``global_step``,
    ``mean_return`` (of the last ``return_window`` episodes), ``episodes``, ``learning_rate``,
    ``policy_loss``, ``value_loss``, ``entropy``, ``approx_kl``, ``clipfrac``,
    ``explained_variance`` and ``seconds`` since the start. ``callback(history)`` runs after every
    update, e.g. to redraw a live return curve.
    """
    previous_threads = torch.get_num_threads()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        return _train(config, callback)
    finally:
        torch.set_num_threads(previous_threads)


def _train(config: GymPPOConfig, callback) -> tuple[Agent, TrainHistory]:
    seed_everything(config.seed)  # reproducibility: Python, NumPy and torch (the envs below)
    device = torch.device(config.device)
    envs = make_envs(config.env_id, config.num_envs, config.seed)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    agent = Agent(obs_dim, int(envs.single_action_space.n), config.hidden_size).to(device)
    # detail 3: Adam's epsilon 1e-5 rather than the default 1e-8
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5)

    # Rollout buffer, laid out (B, T) = (num_envs, num_steps) like a batch of LM responses.
    B, T = config.num_envs, config.num_steps
    obs = torch.zeros((B, T, obs_dim), device=device)
    actions = torch.zeros((B, T), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, T), device=device)
    rewards = torch.zeros((B, T), device=device)
    dones = torch.zeros((B, T), dtype=torch.bool, device=device)
    values = torch.zeros((B, T), device=device)
    full_mask = torch.ones((B, T), device=device)  # every step of a gym rollout is real
    minibatch_mask = torch.ones(config.minibatch_size, device=device)

    history = TrainHistory(config=asdict(config))
    running_return = np.zeros(B)  # undiscounted return of each environment's current episode
    global_step = 0
    start = time.perf_counter()
    next_obs_np, _ = envs.reset(seed=config.seed)  # env i is seeded with seed + i
    next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device).reshape(B, obs_dim)

    progress = tqdm(total=config.total_timesteps, desc=config.env_id, disable=not config.progress_bar)
    for update in range(1, config.num_updates + 1):
        # detail 4: linear learning-rate annealing from learning_rate to 0
        if config.anneal_lr:
            frac = 1.0 - (update - 1.0) / config.num_updates
            optimizer.param_groups[0]["lr"] = frac * config.learning_rate

        # ---- Rollout: play T steps in each of the B environments with the current policy ----
        agent.eval()
        for step in range(T):
            global_step += B
            obs[:, step] = next_obs
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            actions[:, step], logprobs[:, step], values[:, step] = action, logprob, value

            next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
            running_return += reward
            reward = reward.astype(np.float32)
            # Time-limit truncation is not a real ending (the pole is still up at step 500): the
            # episode would have gone on, so bootstrap it with the value of the state it reached.
            timeouts = truncated & ~terminated
            if config.bootstrap_truncation and timeouts.any():
                final_obs = np.stack(info["final_obs"][timeouts]).reshape(-1, obs_dim)
                with torch.no_grad():
                    final_obs = torch.as_tensor(final_obs, dtype=torch.float32, device=device)
                    final_values = agent.get_value(final_obs)
                reward[timeouts] += config.gamma * final_values.cpu().numpy()
            done = terminated | truncated
            rewards[:, step] = torch.as_tensor(reward, device=device)
            dones[:, step] = torch.as_tensor(done, device=device)
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device).reshape(B, obs_dim)

            for env_index in np.flatnonzero(done):
                history.episode_returns.append(float(running_return[env_index]))
                history.episode_end_steps.append(global_step)
                running_return[env_index] = 0.0

        # ---- Advantages: GAE over the (B, T) rollout, bootstrapped from V(next_obs) (detail 5) ----
        with torch.no_grad():
            last_values = agent.get_value(next_obs)  # (B,)
        advantages, returns = ppo.gae(
            rewards, values, full_mask, config.gamma, config.gae_lambda, dones=dones, last_values=last_values
        )

        # ---- Learning: several epochs of shuffled minibatches over the flattened rollout (detail 6) ----
        agent.train()
        b_obs = obs.reshape(-1, obs_dim)
        b_actions, b_logprobs = actions.reshape(-1), logprobs.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)
        stat_names = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")
        stats: dict[str, list[float]] = {name: [] for name in stat_names}
        for _epoch in range(config.update_epochs):
            order = torch.randperm(config.batch_size, device=device)
            for begin in range(0, config.batch_size, config.minibatch_size):
                mb = order[begin : begin + config.minibatch_size]
                _, new_logprob, entropy, new_value = agent.get_action_and_value(b_obs[mb], b_actions[mb])

                mb_advantages = b_advantages[mb]
                if config.norm_adv:  # detail 7: advantage normalisation, per minibatch
                    mb_advantages = ppo.masked_whiten(mb_advantages, minibatch_mask)

                # detail 8: the clipped surrogate objective
                pg_loss, pg_stats = ppo.policy_loss(
                    new_logprob, b_logprobs[mb], mb_advantages, minibatch_mask, config.clip_coef
                )
                # detail 9: value loss, clipped around the rollout's values if asked
                v_loss, _ = ppo.value_loss(
                    new_value,
                    b_values[mb],
                    b_returns[mb],
                    minibatch_mask,
                    config.vf_clip_coef if config.clip_vloss else None,
                )
                entropy_mean = ppo.masked_mean(entropy, minibatch_mask)
                # detail 10: one shared loss; the entropy bonus is subtracted to keep exploring
                loss = pg_loss - config.ent_coef * entropy_mean + config.vf_coef * v_loss

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm)  # detail 11
                optimizer.step()

                stats["policy_loss"].append(pg_loss.item())
                stats["value_loss"].append(v_loss.item())
                stats["entropy"].append(entropy_mean.item())
                stats["approx_kl"].append(pg_stats["approx_kl"].item())
                stats["clipfrac"].append(pg_stats["clipfrac"].item())
            # optional early stopping (Spinning Up's target_kl): end this update's epochs once the
            # policy has moved too far from the one that collected the rollout
            if config.target_kl is not None and stats["approx_kl"][-1] > config.target_kl:
                break

        # ---- Bookkeeping: the debug variables of detail 12 ----
        row = {
            "update": update,
            "global_step": global_step,
            "mean_return": history.mean_recent_return(config.return_window),
            "episodes": len(history.episode_returns),
            "learning_rate": optimizer.param_groups[0]["lr"],
            **{name: float(np.mean(v)) for name, v in stats.items()},
            # how much of the returns' variance the value head explains (1 = all, <= 0 = none)
            "explained_variance": ppo.explained_variance(b_values, b_returns),
            "seconds": time.perf_counter() - start,
        }
        history.updates.append(row)
        progress.update(B * T)
        progress.set_postfix(mean_return=f"{row['mean_return']:.1f}", refresh=False)
        if callback is not None:
            callback(history)
        if (
            config.stop_at_return is not None
            and len(history.episode_returns) >= config.return_window
            and row["mean_return"] >= config.stop_at_return
        ):
            break

    progress.close()
    envs.close()
    agent.eval()
    return agent, history
