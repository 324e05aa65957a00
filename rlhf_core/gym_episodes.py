"""Using a trained gymnasium agent (chapter 00): evaluate it, record an episode, animate it."""

from __future__ import annotations

import os

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation

from .gym_ppo import Agent


def evaluate(agent: Agent, env_id: str, n_episodes: int = 10, seed: int = 10_000, greedy: bool = True) -> list[float]:
    """Returns of ``n_episodes`` fresh episodes played by the agent (seeds ``seed``, ``seed + 1``, ...)."""
    env = gym.make(env_id)
    returns = []
    for i in range(n_episodes):
        observation, _ = env.reset(seed=seed + i)
        total, finished = 0.0, False
        while not finished:
            action = agent.act(torch.as_tensor(observation, dtype=torch.float32)[None], greedy=greedy)
            observation, reward, terminated, truncated, _ = env.step(int(action[0]))
            total += float(reward)
            finished = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def record_episode(
    agent: Agent,
    env_id: str,
    seed: int = 0,
    greedy: bool = True,
    frame_every: int = 1,
    max_steps: int | None = None,
) -> tuple[list[np.ndarray], float]:
    """Play one episode with ``render_mode="rgb_array"``; returns (frames, episode return).

    Every ``frame_every``-th frame is kept (the last one always), so long episodes stay small.
    """
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # Headless (CI, Colab): rgb_array frames need no window, and without this SDL prints a
        # harmless but confusing "XDG_RUNTIME_DIR is invalid" error into the notebook.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env = gym.make(env_id, render_mode="rgb_array")
    observation, _ = env.reset(seed=seed)
    frames = [env.render()]
    total, step, finished = 0.0, 0, False
    while not finished and (max_steps is None or step < max_steps):
        action = agent.act(torch.as_tensor(observation, dtype=torch.float32)[None], greedy=greedy)
        observation, reward, terminated, truncated, _ = env.step(int(action[0]))
        total += float(reward)
        step += 1
        finished = terminated or truncated
        if step % frame_every == 0 or finished:
            frames.append(env.render())
    env.close()
    return frames, total


def frames_to_animation(frames: list[np.ndarray], interval_ms: int = 50, width_inches: float = 3.0):
    """A matplotlib animation of rgb frames; in a notebook show it with ``HTML(anim.to_jshtml())``."""
    height, width = frames[0].shape[:2]
    fig, ax = plt.subplots(figsize=(width_inches, width_inches * height / width), dpi=72)
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    image = ax.imshow(frames[0])

    def draw(i):
        image.set_data(frames[i])
        return (image,)

    anim = animation.FuncAnimation(fig, draw, frames=len(frames), interval=interval_ms, blit=True)
    plt.close(fig)  # the animation is shown as HTML, not as a static figure
    return anim
