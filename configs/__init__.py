"""Hydra config tree of ``forensics`` (a package so it ships with the wheel: ``pkg://configs``).

Importing it registers the ``forensics.run_name`` resolver that ``config.yaml`` uses to
derive a run's directory from its config, so that re-running the same command resumes.
"""

from __future__ import annotations

from omegaconf import OmegaConf

CONFIG_MODULE = "configs"
CONFIG_NAME = "config"


def env_label(env: str, num_agents: int, continuous: bool) -> str:
    """``<env>_<N>[_cont]``, e.g. ``simple_spread_3`` (discrete actions)."""
    return f"{env}_{num_agents}" + ("_cont" if continuous else "")


def run_name(env: str, num_agents: int, continuous: bool, algo: str, seed: int) -> str:
    """``<env>_<N>[_cont]-<algo>-seed<seed>``, e.g. ``simple_spread_3-maddpg-seed0``."""
    return f"{env_label(env, num_agents, continuous)}-{algo}-seed{seed}"


OmegaConf.register_new_resolver("forensics.run_name", run_name, replace=True)
