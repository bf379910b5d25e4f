"""The algorithm-agnostic contract between training algorithms and the CLI.

An algorithm module exposes ``make_trainer(env, algo_cfg) -> Trainer``. The CLI never
looks inside the train state: it calls ``init`` once, then ``train_chunk`` repeatedly
(one jitted call = ``iterations_per_chunk`` iterations under ``lax.scan``), logs the
returned metrics, and hands the state to Orbax for checkpointing.

``policy_params(state)`` extracts what evaluation, attacks and forensics need
(stacked actor params and, where the algorithm has one, stacked critic params), so a
checkpoint can be reloaded for evaluation without rebuilding the optimiser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

TrainState = Any  # a flax.struct pytree owned by the algorithm


class Trainer(NamedTuple):
    init: Callable[[jax.Array], TrainState]
    train_chunk: Callable[[TrainState], tuple[TrainState, Mapping[str, jax.Array]]]
    env_steps_per_chunk: int
    policy_params: Callable[[TrainState], Mapping[str, Any]]


def make_trainer(algo_name: str, env: Any, algo_cfg: Mapping[str, Any]) -> Trainer:
    """Build the trainer for ``algo_name`` (``algo.name`` in the Hydra config)."""
    if algo_name == "maddpg":
        from agents import maddpg

        return maddpg.make_trainer(env, algo_cfg)
    raise ValueError(f"algo.name: unknown algorithm {algo_name!r}; expected one of: maddpg")
