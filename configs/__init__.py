"""Hydra config tree of ``forensics`` (a package so it ships with the wheel: ``pkg://configs``).

Importing it registers the ``forensics.run_name`` resolver that ``config.yaml`` uses to
derive a run's directory from its config, so that re-running the same command resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

CONFIG_MODULE = "configs"
CONFIG_NAME = "config"


def env_label(env: Mapping[str, Any]) -> str:
    """``<env>_<map>`` for maps (``smax_3s_vs_3z``), else ``<env>_<N>[_cont]``
    (``simple_spread_3``, ``simple_spread_3_cont``)."""
    if env.get("map_name"):
        return f"{env['name']}_{env['map_name']}"
    return f"{env['name']}_{env['num_agents']}" + ("_cont" if env["continuous"] else "")


def run_name(env: Mapping[str, Any], algo: str, seed: int) -> str:
    """``<env label>-<algo>-seed<seed>``, e.g. ``simple_spread_3-maddpg-seed0``."""
    return f"{env_label(env)}-{algo}-seed{seed}"


OmegaConf.register_new_resolver("forensics.run_name", run_name, replace=True)
