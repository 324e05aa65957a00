"""rlhf_core: the real implementations behind the course's notebooks.

Every chapter in ``chapters/`` imports this package; the notebooks explain, call, inspect and
plot, while the algorithms (SFT, the reward model, PPO, DPO) live here as small modules with one
idea each. ``python -m rlhf_core --help`` lists the command-line entry points.
"""

__version__ = "0.1.0"
