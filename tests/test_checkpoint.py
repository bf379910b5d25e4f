"""Orbax checkpoints of a real (tiny) MADDPG run: exact round trip, metadata, retention,
policy-only loading and refusal of a mismatching config."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from agents import checkpoint
from cli import enable_compilation_cache
from cli.hydra_entry import compose_config
from cli.training import build
from configs.schema import ConfigError
from forensics.store import CheckpointError

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A chunk of algo=maddpg_smoke trained and checkpointed: (config, env, trainer, state, dir)."""
    enable_compilation_cache()
    config = compose_config(["algo=maddpg_smoke"])
    env, trainer = build(config)
    state, _ = trainer.train_chunk(trainer.init(KEY))  # non-trivial buffer and optimiser
    run_dir = tmp_path_factory.mktemp("run")
    meta = checkpoint.make_meta(config, env.spec, trainer.env_steps_per_chunk, chunk=1)
    checkpoint.save(checkpoint.manager(run_dir, keep=2), state, trainer.policy_params(state), meta)
    return config, env, trainer, state, run_dir


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restored_state_is_identical(run):
    _, _, trainer, state, run_dir = run
    restored = checkpoint.restore_state(
        checkpoint.manager(run_dir), jax.eval_shape(trainer.init, KEY)
    )
    _assert_trees_equal(state, restored)


def test_metadata_records_config_spec_step_and_code_version(run):
    config, env, trainer, _, run_dir = run
    meta = checkpoint.latest_meta(checkpoint.manager(run_dir))
    assert meta["config"] == config
    assert meta["env_spec"]["obs_dim"] == env.spec.obs_dim
    assert (meta["algo"], meta["env_steps"], meta["chunk"]) == (
        "maddpg",
        trainer.env_steps_per_chunk,
        1,
    )
    assert meta["code_version"]


def test_load_policy_restores_only_the_policy(run):
    config, env, trainer, state, run_dir = run
    policy = checkpoint.load_policy(run_dir, config)
    _assert_trees_equal(trainer.policy_params(state), policy.params)
    assert policy.env.spec == env.spec and policy.env_steps == trainer.env_steps_per_chunk
    obs, _ = policy.env.reset(KEY)
    actions = checkpoint.greedy_act_fn(policy)(obs)
    assert actions.shape == (env.spec.num_agents,) and actions.dtype == np.int32


@pytest.mark.parametrize(
    "override,field",
    [
        ("algo.lr_actor=0.5", "algo.lr_actor"),
        ("algo.actor_hidden=[32]", "algo.actor_hidden"),
        ("env=simple_spread_5", "env.num_agents"),
        ("env.continuous=true", "env.continuous"),
        ("seed=7", "seed"),
    ],
)
def test_mismatching_config_is_refused_naming_the_field(run, override, field):
    _, _, _, _, run_dir = run
    other = compose_config(["algo=maddpg_smoke", override])
    with pytest.raises(ConfigError, match=rf"^{field}: the checkpoint in .* was trained with"):
        checkpoint.load_policy(run_dir, other)


def test_training_length_and_logging_settings_may_change(run):
    config, _, _, _, run_dir = run
    longer = compose_config(["algo=maddpg_smoke", "train.total_env_steps=5000000"])
    checkpoint.check_compatible(checkpoint.latest_meta(checkpoint.manager(run_dir)), longer, "x")


def test_a_field_added_later_matches_old_checkpoints_only_at_its_old_value():
    """A HATRPO checkpoint written before algo.entropy_coef existed trained with no bonus:
    a config with 0 resumes it, 0.05 is another run (the error names the old value)."""
    config = compose_config(["algo=hatrpo"])
    old = {**config, "algo": {k: v for k, v in config["algo"].items() if k != "entropy_coef"}}
    checkpoint.check_compatible({"config": old}, config, "x")
    changed = {**config, "algo": {**config["algo"], "entropy_coef": 0.05}}
    with pytest.raises(
        ConfigError, match=r"^algo.entropy_coef: .* trained with algo.entropy_coef=0.0, but .*=0.05"
    ):
        checkpoint.check_compatible({"config": old}, changed, "x")


def test_only_the_newest_checkpoints_are_kept(run, tmp_path):
    config, env, trainer, state, _ = run
    mngr = checkpoint.manager(tmp_path, keep=2)
    policy = trainer.policy_params(state)
    for chunk in (1, 2, 3):
        meta = checkpoint.make_meta(config, env.spec, 10 * chunk, chunk)
        checkpoint.save(mngr, policy, policy, meta)
    assert sorted(mngr.all_steps()) == [20, 30]
    assert checkpoint.latest_meta(checkpoint.manager(tmp_path))["chunk"] == 3


def test_load_policy_outside_a_run_directory_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints/ here"):
        checkpoint.load_policy(tmp_path)


def test_a_train_state_of_another_layout_is_refused_in_one_line(run):
    """A checkpoint whose train state has another structure (e.g. written before the replay
    buffer recorded action masks) names itself and the code version, without a traceback."""
    _, _, trainer, _, run_dir = run
    abstract = jax.eval_shape(trainer.init, KEY)
    other = abstract.replace(buffer={"only": abstract.buffer.data.obs})  # another layout
    mngr = checkpoint.manager(run_dir)
    with pytest.raises(ConfigError, match=r"checkpoints/\d+: the train state was saved by code "):
        checkpoint.restore_state(mngr, other, checkpoint.latest_meta(mngr))
