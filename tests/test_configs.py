"""The Hydra config tree: every env × algo × attack composes, validates and builds;
bad values and misspelt names are rejected before any work, with the field named."""

from __future__ import annotations

import itertools
from importlib import resources

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from cli.hydra_entry import compose_config
from cli.training import build
from configs.schema import ConfigError


def _options(group: str) -> list[str]:
    """Every config file of a group, so new files are covered without editing this test."""
    files = resources.files("configs").joinpath(group).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


GAME_ENVS = [e for e in _options("env") if e.startswith("sc2_")]  # real game: no training
TRAIN_ENVS = [e for e in _options("env") if e not in GAME_ENVS]
COMBINATIONS = list(itertools.product(TRAIN_ENVS, _options("algo"), _options("attack")))


def pairwise(envs: list[str], algos: list[str], attacks: list[str]) -> list[tuple[str, ...]]:
    """Every (algo, attack) and every (env, algo) pair at least once, the third option
    cycling, so every pair of options is composed together in a few hundred cases instead of
    the whole product (``make sweep-smoke`` and ``-m slow`` run all of it)."""
    cases = {
        (envs[(i + j) % len(envs)], algo, attack)
        for i, algo in enumerate(algos)
        for j, attack in enumerate(attacks)
    }
    cases |= {
        (env, algo, attacks[(i + j) % len(attacks)])
        for i, env in enumerate(envs)
        for j, algo in enumerate(algos)
    }
    return sorted(cases)


PAIRWISE = pairwise(TRAIN_ENVS, _options("algo"), _options("attack"))


def test_every_group_has_options():
    assert {"simple_spread_3", "simple_spread_5"} <= set(_options("env"))
    assert "maddpg" in _options("algo") and "none" in _options("attack")


def _compose_and_build(env: str, algo: str, attack: str) -> None:
    config = compose_config([f"env={env}", f"algo={algo}", f"attack={attack}"])
    built_env, trainer = build(config)
    assert built_env.spec.num_agents == config["env"]["num_agents"]
    assert trainer.env_steps_per_chunk > 0


@pytest.mark.parametrize("env,algo,attack", PAIRWISE)
def test_every_pair_of_options_composes_validates_and_builds(env, algo, attack):
    _compose_and_build(env, algo, attack)


@pytest.mark.slow
@pytest.mark.parametrize("env,algo,attack", COMBINATIONS)
def test_every_combination_composes_validates_and_builds(env, algo, attack):
    _compose_and_build(env, algo, attack)


@pytest.mark.parametrize("env", GAME_ENVS)
def test_game_envs_compose_validate_and_refuse_training(env):
    config = compose_config([f"env={env}"])
    assert config["env"]["name"] == "sc2"
    with pytest.raises(ConfigError, match=r"env.name: sc2 is the real game, .* env=smax_"):
        build(config)


def test_defaults_are_the_documented_ones():
    config = compose_config()
    assert (config["env"]["name"], config["env"]["num_agents"]) == ("simple_spread", 3)
    assert config["env"]["continuous"] is False
    assert (config["algo"]["name"], config["attack"]["name"]) == ("maddpg", "none")


def test_run_directories_are_deterministic():
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["env=simple_spread_5", "env.continuous=true", "seed=3"],
            return_hydra_config=True,
        )
        assert cfg.hydra.run.dir == "runs/simple_spread_5_cont-maddpg-seed3"
        assert cfg.hydra.sweep.dir == "runs/sweeps/default"


BAD_VALUES = [
    ("train.total_env_steps=-5", "train.total_env_steps: expected an integer >= 1, got -5"),
    ("train.checkpoint_every_chunks=0", "train.checkpoint_every_chunks: expected"),
    ("train.eval_episodes=many", "train.eval_episodes: expected an integer >= 0, got 'many'"),
    ("env.num_agents=1", "env.num_agents: expected an integer >= 2, got 1"),
    (
        "env.name=simple_sprawl",
        "env.name: expected one of sc2, simple_spread, smax, got 'simple_sprawl'",
    ),
    ("env.continuous=maybe", "env.continuous: expected true or false"),
    ("seed=-1", "seed: expected an integer in [0, 2**31), got -1"),
    ("seed=4294967296", "seed: expected an integer in [0, 2**31), got 4294967296"),
    ("env=smax_3m env.map_name=4m", "env.map_name: unknown SMAX map '4m'"),
    ("env=smax_2s3z env.num_agents=3", "env.num_agents: map 2s3z has 5 allies, got 3"),
    ("+env.sight=3", "env.sight: unknown key for env simple_spread"),
    ("attack.name=gremlin", "attack.name: unknown attack 'gremlin'"),
    ("+attack.window=0", "attack.window: expected an integer >= 1, got 0"),
    ("attack=obs_dropout attack.p=2", "attack.p: expected a probability in [0, 1], got 2"),
    (
        "attack=obs_bias attack.features=[enemies]",
        "attack.features: simple_spread: unknown feature group 'enemies'",
    ),
    ("env=smax_3m attack=obs_bias attack.features=[enemy_health]", None),
    (
        "attack=action_second_best env.continuous=true",
        "attack.name: action_second_best ranks discrete actions",
    ),
    ("algo.name=ppo", "algo.name: unknown algorithm 'ppo'"),
    ("algo.lr_actor=-0.1", "algo.lr_actor"),
    ("algo.batch_size=0", "algo.batch_size"),
    ("algo.actor_hidden=[64,-1]", "algo.actor_hidden"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_values_fail_with_the_field_named(override, message):
    if message is None:  # the same kind of value, valid here (the check is per env)
        build(compose_config(override.split()))
        return
    with pytest.raises(ConfigError) as err:
        build(compose_config(override.split()))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_section_keys_are_rejected():
    with pytest.raises(ConfigError, match=r"^env\.colour: unknown key"):
        compose_config(["+env.colour=red"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("trian.total_env_steps=5", "Key 'trian' is not in struct"),
        ("train.total_env_stepz=5", "Key 'total_env_stepz' is not in struct"),
        ("env=simple_sprad_3", "Could not find 'env/simple_sprad_3'"),
    ],
)
def test_misspelt_keys_and_groups_fail_in_hydra(override, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    text = f"{err.value} {err.value.__cause__}"
    assert message in text
