"""Parity of the JAX Simple Spread with mpe2's PettingZoo simple_spread_v3, plus jit/vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import make_env
from envs.pettingzoo_ref import PettingZooSpread
from envs.simple_spread import SimpleSpread, gap_closed

CONFIGS = [(3, False), (3, True), (5, False), (5, True)]


def _random_actions(rng: np.random.Generator, n: int, continuous: bool) -> np.ndarray:
    # Continuous actions slightly outside [0, 1] also exercise the reference's clipping.
    if continuous:
        return rng.uniform(-0.1, 1.1, (n, 5)).astype(np.float32)
    return rng.integers(0, 5, n)


def _max_errors(n: int, continuous: bool, seeds: range, clustered: bool) -> tuple[float, float]:
    """Drive both envs with the same actions from the same start; return max |Δobs|, |Δrew|.

    ``clustered`` starts agents in a 0.6-wide box with random velocities, so contact
    forces and collision penalties fire often. Also asserts both end on transition 25.
    """
    ref = PettingZooSpread(n, continuous)
    env = SimpleSpread(n, continuous)
    step = jax.jit(env.step)
    key = jax.random.PRNGKey(0)
    obs_err = rew_err = 0.0
    for seed in seeds:
        ref.reset(seed=seed)
        rng = np.random.default_rng(seed)
        agent_pos, agent_vel, landmark_pos = ref.world_arrays()
        if clustered:
            agent_pos = rng.uniform(-0.3, 0.3, (n, 2))
            agent_vel = rng.uniform(-1.0, 1.0, (n, 2))
        obs_ref = ref.set_state(agent_pos, agent_vel, landmark_pos)
        state = env.state_from(agent_pos, agent_vel, landmark_pos)
        np.testing.assert_allclose(
            np.asarray(env.global_state(state), np.float32), ref.state(), atol=1e-6
        )
        obs_err = max(obs_err, np.abs(np.asarray(env.observations(state)) - obs_ref).max())
        for t in range(1, 26):
            actions = _random_actions(rng, n, continuous)
            obs_ref, rew_ref, done_ref = ref.step(actions)
            obs, state, rew, done, _ = step(key, state, jnp.asarray(actions))
            obs_err = max(obs_err, np.abs(np.asarray(obs) - obs_ref).max())
            rew_err = max(rew_err, np.abs(np.asarray(rew) - rew_ref).max())
            assert bool(done) == done_ref == (t == 25), f"done mismatch at transition {t}"
    return obs_err, rew_err


@pytest.mark.parametrize("n,continuous", CONFIGS)
def test_parity_float32_reference_starts(n: int, continuous: bool) -> None:
    obs_err, rew_err = _max_errors(n, continuous, range(4), clustered=False)
    assert obs_err < 1e-5 and rew_err < 1e-5, (obs_err, rew_err)


@pytest.mark.parametrize("n,continuous", CONFIGS)
def test_parity_float64_with_contacts(n: int, continuous: bool) -> None:
    # In float64 the two implementations must agree to rounding even through contacts.
    with jax.enable_x64(True):
        obs_err, rew_err = _max_errors(n, continuous, range(4), clustered=True)
    assert obs_err < 1e-6 and rew_err < 1e-9, (obs_err, rew_err)


def test_spec_matches_reference_spaces() -> None:
    for n, continuous in CONFIGS:
        spec = make_env("simple_spread", n, continuous).spec
        ref = PettingZooSpread(n, continuous).env
        assert spec.obs_dim == ref.observation_space("agent_0").shape[0] == 6 * n
        assert spec.state_dim == ref.state_space.shape[0] == n * spec.obs_dim
        assert spec.action_dim == 5 and spec.discrete == (not continuous)


def test_jit_vmap_rollout_and_determinism() -> None:
    env = SimpleSpread(3, continuous=False)
    num_envs = 64

    @jax.jit
    def rollout(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        k_reset, k_act = jax.random.split(key)
        obs, state = jax.vmap(env.reset)(jax.random.split(k_reset, num_envs))

        def body(state, k):
            acts = jax.random.randint(k, (num_envs, 3), 0, 5)
            keys = jax.random.split(k, num_envs)
            obs, state, rew, done, _ = jax.vmap(env.step)(keys, state, acts)
            return state, (rew, done)

        state, (rew, done) = jax.lax.scan(body, state, jax.random.split(k_act, 25))
        return obs, rew, done

    obs0, rew, done = rollout(jax.random.PRNGKey(1))
    assert obs0.shape == (num_envs, 3, 18) and rew.shape == (25, num_envs, 3)
    assert bool(done[-1].all()) and not bool(done[:-1].any())
    assert bool(jnp.isfinite(rew).all())
    again = rollout(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(rew), np.asarray(again[1]))
    other = rollout(jax.random.PRNGKey(2))
    assert not np.array_equal(np.asarray(rew), np.asarray(other[1]))


@pytest.mark.parametrize("continuous", [False, True])
def test_scripted_controller_closes_most_of_reference_gap(continuous: bool) -> None:
    env = SimpleSpread(3, continuous)

    def episode_return(key: jax.Array) -> jax.Array:
        _, state = env.reset(key)

        def body(state, k):
            _, state, rew, _, _ = env.step(k, state, env.scripted_actions(state))
            return state, rew

        _, rew = jax.lax.scan(body, state, jax.random.split(key, 25))
        return rew.sum(0).mean()

    keys = jax.random.split(jax.random.PRNGKey(3), 64)
    ret = float(jax.jit(jax.vmap(episode_return))(keys).mean())
    assert gap_closed(ret, 3, continuous) > 0.8, ret


def test_make_env_errors() -> None:
    with pytest.raises(ValueError, match="unknown environment"):
        make_env("simple_tag", 3, False)
    with pytest.raises(ValueError, match="num_agents"):
        make_env("simple_spread", 1, False)
    with pytest.raises(ValueError, match="agent_pos"):
        SimpleSpread(3, False).state_from(np.zeros((2, 2)), np.zeros((3, 2)), np.zeros((3, 2)))
