"""Validation of a composed run config, before any work starts.

Hydra already rejects misspelt groups and keys (the composed config is in struct mode);
this module checks the *values* of the sections every run shares (top level, ``env``,
``train``) and reports the first problem as one line ``<field>: expected <what>, got
<value>``. The ``attack`` section is parsed by ``agents.attacks.Attack.from_config`` and an
algorithm's ``algo.*`` settings by the algorithm itself (``make_trainer``); both name the
field in the same way, so each knob is checked in exactly one place.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agents.attacks import Attack
from envs import ENVS, make_env


class ConfigError(CompactHydraException, ValueError):
    """An invalid config value. Hydra prints its message alone, without a traceback."""


@dataclass(frozen=True)
class Rule:
    expected: str
    ok: Callable[[Any], bool]


def int_at_least(lo: int) -> Rule:
    return Rule(
        f"an integer >= {lo}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo
    )


def one_of(names: Collection[str]) -> Rule:
    return Rule("one of " + ", ".join(sorted(names)), lambda v: v in names)


# Every seed of every command: jax.random.PRNGKey takes an int32 (without jax_enable_x64
# a larger value wraps or overflows), so one rule, [0, 2**31), checked by ``check_seed``.
SEED_LIMIT = 2**31
SEED = Rule(
    "an integer in [0, 2**31)",
    lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < SEED_LIMIT,
)


def check_seed(value: Any, field: str) -> int:
    """``value`` if it is a valid seed (``SEED``), else ``ConfigError`` naming ``field``."""
    if not SEED.ok(value):
        raise ConfigError(f"{field}: expected {SEED.expected}, got {value!r}")
    return value


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
NAME = Rule("a non-empty name without '/'", lambda v: isinstance(v, str) and v and "/" not in v)
PATH = Rule("a non-empty path", lambda v: isinstance(v, str) and bool(v))

TOP_RULES: dict[str, Rule] = {
    "seed": SEED,
    "out_dir": PATH,
    "run_name": NAME,
    "sweep_name": NAME,
}

ENV_RULES: dict[str, Rule] = {
    "name": one_of(ENVS),
    "num_agents": int_at_least(2),
    "continuous": BOOL,
}

TRAIN_RULES: dict[str, Rule] = {
    "total_env_steps": int_at_least(1),
    "checkpoint_every_chunks": int_at_least(1),
    "checkpoints_to_keep": int_at_least(1),
    "eval_episodes": int_at_least(0),
    "progress": BOOL,
}


def _check_values(section: Mapping[str, Any], prefix: str, rules: Mapping[str, Rule]) -> None:
    for key, rule in rules.items():
        if key not in section:
            raise ConfigError(f"{prefix}{key}: missing; expected {rule.expected}")
        if not rule.ok(section[key]):
            raise ConfigError(f"{prefix}{key}: expected {rule.expected}, got {section[key]!r}")


def _section(cfg: Mapping[str, Any], group: str) -> Mapping[str, Any]:
    section = cfg.get(group)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{group}: missing; expected a {group} config")
    return section


def _check_section(cfg: Mapping[str, Any], group: str, rules: Mapping[str, Rule]) -> None:
    """``cfg[group]`` is a mapping with exactly the keys of ``rules``, each valid."""
    section = _section(cfg, group)
    _check_values(section, f"{group}.", rules)
    extra = sorted(set(section) - set(rules))
    if extra:
        raise ConfigError(f"{group}.{extra[0]}: unknown key; expected only {', '.join(rules)}")


def resolve(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain containers with interpolations resolved (``hydra`` node dropped)."""
    try:
        container = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    container.pop("hydra", None)
    return container


def validate(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Check a run config; returns it resolved, or raises ``ConfigError`` naming the field."""
    plain = resolve(cfg)
    _check_values(plain, "", TOP_RULES)
    env = _section(plain, "env")
    _check_values(env, "env.", ENV_RULES)
    try:  # the environment checks its own options (map names, limits, ...)
        built = make_env(**env)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_section(plain, "train", TRAIN_RULES)
    _check_values(_section(plain, "algo"), "algo.", {"name": NAME})
    try:  # the attack checks its own values, then what only the env can tell (groups, ...)
        Attack.from_config(_section(plain, "attack")).check_env(built.spec)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return plain


def check_attack_fits(attack: Attack, spec: Any) -> None:
    """The attack's window fits the env it runs on, else ``ConfigError``. Called where the
    env is known (a rollout's env is its checkpoint's, not the composed config's).

    An error, not a warning: with ``attack.window`` longer than the episode no onset can
    hold the window (onsets are drawn from [0, T − window]), every attacked episode would be
    attacked from some step to its end, and the store's ``window`` column would record a
    window that never happened. A window that merely runs past the end of a late onset is
    the documented truncation and passes."""
    if attack.name != "none" and attack.window > spec.episode_length:
        raise ConfigError(
            f"attack.window: expected an integer <= the episode length of {spec.name} "
            f"({spec.episode_length} steps), got {attack.window}"
        )
