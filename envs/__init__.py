"""Environment registry: ``make_env(name, num_agents, continuous, **options)``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from envs import simple_spread, smax
from envs.base import EnvLayout, EnvSpec, MultiAgentEnv

# name -> "module:class", imported on first use: the SC2 adapter pulls in the game's protocol
# buffers, which a machine that only trains or diagnoses need not have (a GPU box, say).
# "sc2" is the real game, stepped from Python: it evaluates policies, it does not train them.
ENVS: dict[str, str] = {
    "simple_spread": "envs.simple_spread:SimpleSpread",
    "smax": "envs.smax:Smax",
    "sc2": "envs.sc2:Sc2Env",
}
JITTABLE_ENVS = ("simple_spread", "smax")
MASKED_ENVS = ("smax", "sc2")  # envs whose legal actions change from step to step

__all__ = [
    "ENVS",
    "JITTABLE_ENVS",
    "MASKED_ENVS",
    "EnvLayout",
    "EnvSpec",
    "MultiAgentEnv",
    "layout",
    "make_env",
]


def layout(spec: EnvSpec) -> EnvLayout:
    """The named feature groups and action facts of an env (``envs.base.EnvLayout``): the
    one home of "which observation entries are the landmarks / the enemies / my velocity".

    A function of the spec alone, so a store or a checkpoint (which record the spec) gets
    the same groups as the live env. The real game (sc2) has SMAX's layout.
    """
    if spec.name == "simple_spread":
        return simple_spread.layout(spec.num_agents, not spec.discrete)
    if spec.name in ("smax", "sc2"):
        return smax.layout_of(spec)
    raise ValueError(f"env {spec.name}: no feature layout; known for simple_spread, smax, sc2")


def make_env(name: str, num_agents: int, continuous: bool, **options: Any) -> MultiAgentEnv:
    """Build a registered environment; ``options`` are its constructor's other keywords
    (``env.<key>`` in a config: an unknown one is refused by name)."""
    if name not in ENVS:
        raise ValueError(f"env.name: unknown environment {name!r}; expected one of {sorted(ENVS)}")
    if num_agents < 2:
        raise ValueError(f"env.num_agents: expected an integer >= 2, got {num_agents}")
    module, cls_name = ENVS[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    known = set(inspect.signature(cls).parameters) - {"num_agents", "continuous"}
    for key in sorted(set(options) - known):
        raise ValueError(
            f"env.{key}: unknown key for env {name}; expected only "
            f"{', '.join(['name', 'num_agents', 'continuous', *sorted(known)])}"
        )
    return cls(num_agents=num_agents, continuous=continuous, **options)
