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

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax

from agents.precision import float32_matmuls

TrainState = Any  # a flax.struct pytree owned by the algorithm
ConfigT = TypeVar("ConfigT")

ALGORITHMS = ("maddpg", "hatrpo")


class Trainer(NamedTuple):
    init: Callable[[jax.Array], TrainState]
    train_chunk: Callable[[TrainState], tuple[TrainState, Mapping[str, jax.Array]]]
    env_steps_per_chunk: int
    policy_params: Callable[[TrainState], Mapping[str, Any]]


def make_trainer(algo_name: str, env: Any, algo_cfg: Mapping[str, Any]) -> Trainer:
    """Build the trainer for ``algo_name`` (``algo.name`` in the Hydra config)."""
    if algo_name == "maddpg":
        from agents import maddpg

        return _float32(maddpg.make_trainer(env, algo_cfg))
    if algo_name == "hatrpo":
        from agents import hatrpo

        return _float32(hatrpo.make_trainer(env, algo_cfg))
    raise ValueError(
        f"algo.name: unknown algorithm {algo_name!r}; expected one of: {', '.join(ALGORITHMS)}"
    )


def parse_algo_config(
    cls: type[ConfigT], cfg: Mapping[str, Any], label: str, section: str = "algo"
) -> ConfigT:
    """The frozen dataclass ``cls`` from ``cfg`` (``name`` ignored), each value coerced to
    its field default's type, then ``validate()``-d; errors name the field
    (``<section>.<field>``)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields - {"name"})
    if unknown:
        raise ValueError(
            f"{section}.{unknown[0]}: unknown {label} setting; expected one of {sorted(fields)}"
        )
    values = {
        name: coerce_field(name, value, getattr(cls, name), section)
        for name, value in cfg.items()
        if name != "name"
    }
    config = cls(**values)
    config.validate()
    return config


def coerce_field(name: str, value: Any, default: Any, section: str = "algo") -> Any:
    """Convert a config value to the type of the field's default, or raise naming it."""
    try:
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(default, bool):  # before int: bool is an int subclass
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, tuple):
            if isinstance(value, str | bytes):
                raise TypeError
            out = tuple(value)  # list, tuple or an OmegaConf ListConfig
            if not all(isinstance(w, int) and not isinstance(w, bool) for w in out):
                raise TypeError
            return out
        if isinstance(value, bool):
            raise TypeError
        if isinstance(default, int):
            if not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
                raise TypeError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        kind = "a list of ints" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"{section}.{name} must be {kind}, got {value!r}") from None


def _float32(trainer: Trainer) -> Trainer:
    """Training chunks with full float32 matrix products (``agents.precision``): a GPU's
    default TF32 products make one chunk's parameters differ from the CPU's by up to 98× the
    float32 tolerance (H200, tests/numerics.py cases), so a seed would train a different
    policy on each backend."""
    return trainer._replace(train_chunk=float32_matmuls(trainer.train_chunk))
