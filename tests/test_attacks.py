"""Attacks on one agent and the paper's onset selection (fast: small real networks)."""

from __future__ import annotations

import functools
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_team
from omegaconf import OmegaConf

import configs
from agents import attacks
from agents.attacks import START_MODES, Attack, Step, Team


@functools.cache
def real_team(n: int, continuous: bool):
    """``helpers.random_team`` plus a few true observations."""
    env, team, ap, cp = random_team(n, continuous)
    obs = jax.jit(jax.vmap(lambda k: env.reset(k)[0]))(jax.random.split(jax.random.PRNGKey(2), 8))
    return env, team, ap, cp, obs


def make_step(team: Team, ap, obs: jax.Array, victim: int, observed: int = 0) -> Step:
    n, a = obs.shape[0], team.spec.action_dim
    avail = jnp.ones((n, a), bool)
    clean = team.greedy(jax.vmap(team.actor_apply)(ap, obs), avail)
    return Step(obs, avail, team.critic_input(clean), jnp.int32(victim), jnp.int32(observed))


# ------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw, field",
    [
        ({"name": "obs_fgsm", "epsilon": -0.1}, "attack.epsilon"),
        ({"name": "worst_action", "window": 0}, "attack.window"),
        ({"name": "nope"}, "attack.name"),
        ({"name": "obs_gaussian", "sigma": -1.0}, "attack.sigma"),
        ({"name": "worst_action", "start": "sometimes"}, "attack.start"),
        ({"name": "worst_action", "victim": "everyone"}, "attack.victim"),
        ({"name": "obs_pgd", "steps": 0}, "attack.steps"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field) as err:
        Attack.from_config(kw)
    assert "\n" not in str(err.value)


def test_from_config_rejects_unknown_keys_and_reads_lists():
    with pytest.raises(ValueError, match="attack.eps: unknown key"):
        Attack.from_config({"name": "obs_fgsm", "eps": 0.1})
    a = Attack.from_config({"name": "worst_action", "start": ["high_influence", "uniform"]})
    assert a.start == ("high_influence", "uniform") and hash(a) == hash(Attack(**vars(a)))
    with pytest.raises(ValueError, match="attack.victim: expected an agent index < 3"):
        attacks.protocol_size(Attack(name="worst_action", victim=3), 3)


def test_every_attack_config_file_builds_an_attack():
    files = sorted((Path(configs.__file__).parent / "attack").glob("*.yaml"))
    built = {f.stem: Attack.from_config(OmegaConf.to_container(OmegaConf.load(f))) for f in files}
    assert set(built) == set(attacks.ATTACKS)
    assert all(a.name == stem for stem, a in built.items())
    assert built["worst_action"].start == ("high_influence", "low_influence")
    assert built["worst_action"].window == 5 and built["obs_pgd"].magnitude > 0


# ----------------------------------------------------------------- worst action
def test_discrete_worst_action_is_the_masked_argmin():
    env, team, ap, _, obs = real_team(3, continuous=False)
    step = make_step(team, ap, obs[0], victim=1)
    logits = jnp.array([0.3, -2.0, 1.0, -1.5, 0.0])
    assert int(attacks.worst_action(team, logits, step, None, 1.0)) == 1
    masked = step._replace(avail=step.avail.at[1, 1].set(False))
    assert int(attacks.worst_action(team, logits, masked, None, 1.0)) == 3
    # through the generic hook too, from the victim's real logits
    out_v = team.actor_apply(attacks.agent_slice(ap, 1), obs[0, 1])
    got = attacks.act(Attack(name="worst_action"), team, None, step, out_v, None, None)
    assert int(got) == int(jnp.argmin(out_v))


def linear_critic(params_j, obs, act):
    """Q_j = Σ w_j ⊙ a: ∇_{a_i} Q_j = w_j[i] exactly."""
    return jnp.sum(params_j["w"] * act)


def test_continuous_worst_action_steps_down_the_observed_critic_and_clips():
    env, team, ap, _, obs = real_team(3, continuous=True)
    team = Team(team.spec, team.actor_apply, linear_critic)
    w = jax.random.normal(jax.random.PRNGKey(5), (3, 3, 5))  # critic j's weights [N, A]
    step = make_step(team, ap, obs[0], victim=2, observed=1)
    out_v = jnp.full((5,), 0.5)
    got = attacks.worst_action(team, out_v, step, {"w": w}, step_size=0.3)
    np.testing.assert_allclose(got, np.clip(0.5 - 0.3 * np.asarray(w[1, 2]), 0.0, 1.0), rtol=1e-6)
    big = attacks.worst_action(team, out_v, step, {"w": w}, step_size=100.0)
    assert np.all((np.asarray(big) == 0.0) | (np.asarray(big) == 1.0))  # clipped to the box


# ------------------------------------------------------------- obs FGSM / PGD
@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize(
    "name, kw", [("obs_fgsm", {}), ("obs_pgd", {"steps": 8, "step_size": 0.01})]
)
def test_obs_attacks_stay_in_the_ball_and_lower_the_team_value(continuous, name, kw):
    env, team, ap, cp, obs = real_team(3, continuous)
    attack = Attack(name=name, epsilon=0.05, **kw)
    victim = 0
    vp = attacks.agent_slice(ap, victim)

    def one(o):
        step = make_step(team, ap, o, victim)
        o_adv = attacks.perceive(attack, team, None, step, vp, cp)
        value = lambda x: attacks.team_value_objective(team, vp, cp, step, x)
        return o_adv - o[victim], value(o[victim]), value(o_adv)

    delta, before, after = jax.jit(jax.vmap(one))(obs)
    assert float(jnp.max(jnp.abs(delta))) <= 0.05 + 1e-6
    assert np.all(np.asarray(after) < np.asarray(before))


def test_pgd_keeps_its_best_iterate():
    # A 1-d objective whose signed steps overshoot: PGD must return the best point seen.
    f = lambda x: jnp.sum((x - 0.03) ** 2)
    x = jnp.zeros(1)
    out = attacks.pgd(f, x, epsilon=1.0, steps=3, step_size=0.5)
    assert float(f(out)) <= float(f(x)) and abs(float(out[0])) <= 1.0


# --------------------------------------------------------------- param noise
def test_param_noise_only_touches_the_victim():
    _, team, ap, _, _ = real_team(3, continuous=False)
    attack = Attack(name="param_noise", sigma=0.2)
    corrupt = jax.jit(partial(attacks.corrupt_params, attack))
    noisy = corrupt(jax.random.PRNGKey(3), ap, jnp.int32(1))
    diffs = []
    for p, q in zip(jax.tree_util.tree_leaves(ap), jax.tree_util.tree_leaves(noisy), strict=True):
        assert np.array_equal(p[0], q[0]) and np.array_equal(p[2], q[2])
        diffs.append(np.asarray(q[1] - p[1]).ravel())
    d = np.concatenate(diffs)
    assert d.size > 500 and abs(d.std() / 0.2 - 1) < 0.1 and abs(d.mean()) < 0.05
    same = attacks.corrupt_params(Attack(name="worst_action"), jax.random.PRNGKey(3), ap, 1)
    assert same is ap


# ------------------------------------------------------------- onset selection
# Hand-made critic with a known geometry: with a = 0,
#   Q_j = m_t ⟨w_j[i], a_i⟩ + ½ s_t ‖a_i‖²  (summed over i)
#   ⇒ g = ∇_{a_i}(−Q_j) = −m_t w_j[i],  G = |m_t| ‖w_j[i]‖,  H = −s_t I,  D = −s_t G².
# m_t and s_t are read from obs[0, 0] and obs[0, 1], so the curvature depends on the step.
M = np.array([8.0, 5.0, 3.0, 7.0, 2.0, 9.0, 20.0, 0.5], np.float32)
S = np.array([1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0], np.float32)
# first 6 steps searched (search_fraction 0.75 of T=8):
#   high = argmax G over D>0 (s<0): t ∈ {1, 2, 4} → t=1 (t=6, G larger, is outside)
#   low  = argmin G over D<0 (s>0): t ∈ {0, 3, 5} → t=3 (t=7, G smaller, is outside)
HIGH, LOW = 1, 3


def quadratic_critic(params_j, obs, act):
    m, s = obs[0, 0], obs[0, 1]
    return m * jnp.sum(params_j["w"] * act) + 0.5 * s * jnp.sum(act**2)


GEOMETRY = jax.jit(partial(attacks.influence_geometry, quadratic_critic))


def quadratic_episode(n=3, a=5):
    obs = np.zeros((len(M), n, 4), np.float32)
    obs[:, 0, 0], obs[:, 0, 1] = M, S
    w = jax.random.normal(jax.random.PRNGKey(7), (n, n, a))  # critic j: w[j] [N(i), A]
    return jnp.asarray(obs), jnp.zeros((len(M), n, a)), {"w": w}


def test_influence_geometry_matches_the_closed_form():
    obs, act, params = quadratic_episode()
    g, d = GEOMETRY(params, obs, act)
    w_norm = np.linalg.norm(np.asarray(params["w"]), axis=-1)  # [j, i]
    g_ref = np.abs(M)[:, None, None] * w_norm[None]
    np.testing.assert_allclose(g, g_ref, rtol=1e-5)
    np.testing.assert_allclose(d, -S[:, None, None] * g_ref**2, rtol=1e-4)


def test_influence_geometry_hvp_equals_the_explicit_hessian_on_a_smooth_critic():
    n, o, a = 3, 4, 5
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    params = {
        "W": jax.random.normal(k1, (n, 8, n * (o + a))) / 4,
        "v": jax.random.normal(k2, (n, 8)),
    }
    crit = lambda p, ob, ac: p["v"] @ jnp.tanh(p["W"] @ jnp.concatenate([ob.ravel(), ac.ravel()]))
    obs, act = jax.random.normal(k3, (2, n, o)), jax.random.uniform(k3, (2, n, a))
    _, d = jax.jit(partial(attacks.influence_geometry, crit))(params, obs, act)
    t, j, i = 1, 2, 0
    pj = jax.tree_util.tree_map(lambda x: x[j], params)

    def neg_q_of_ai(ai):
        return -crit(pj, obs[t], act[t].at[i].set(ai))

    g, h = jax.jit(lambda x: (jax.grad(neg_q_of_ai)(x), jax.hessian(neg_q_of_ai)(x)))(act[t, i])
    np.testing.assert_allclose(d[t, j, i], g @ h @ g, rtol=1e-4, atol=1e-7)
    assert float(jnp.max(jnp.abs(d))) > 1e-4  # the smooth critic has curvature


def test_high_and_low_influence_onsets_on_a_known_critic():
    obs, act, params = quadratic_episode()
    g, d = GEOMETRY(params, obs, act)
    attack = Attack(name="worst_action", search_fraction=0.75, window=2)
    targets = jax.jit(partial(attacks.protocol_targets, attack, 3, len(M)))
    target, cls, fell = targets(jax.random.PRNGKey(0), g, d)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert target.victim.tolist() == [i for i, _ in pairs for _ in range(2)]
    assert target.observed.tolist() == [j for _, j in pairs for _ in range(2)]
    assert [START_MODES[c] for c in cls.tolist()] == ["high_influence", "low_influence"] * 6
    assert target.start.tolist() == [HIGH, LOW] * 6
    assert not bool(fell.any()) and set(target.window.tolist()) == {2}


def test_onset_fallback_when_no_step_has_the_required_curvature():
    g = jnp.array([1.0, 4.0, 2.0, 9.0])
    flat = jnp.zeros(4)  # e.g. a ReLU critic: D ≡ 0
    hi, hi_fell = attacks.select_start(g, flat, "high_influence", 3, None, 0)
    lo, lo_fell = attacks.select_start(g, flat, "low_influence", 3, None, 0)
    assert (int(hi), int(lo), bool(hi_fell), bool(lo_fell)) == (1, 0, True, True)


def test_uniform_onset_covers_every_start_that_fits_the_window():
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    starts, _ = jax.vmap(lambda k: attacks.select_start(None, None, "uniform", 6, k, 20))(keys)
    counts = np.bincount(np.asarray(starts), minlength=21)
    assert counts.size == 21 and np.all(counts > 50)


def test_uniform_victim_draws_one_pair_per_seed():
    attack = Attack(name="worst_action", victim="uniform", start="uniform")
    assert attacks.protocol_size(attack, 5) == 1
    draw = jax.jit(jax.vmap(lambda k: attacks.protocol_targets(attack, 5, 25, k, None, None)[0]))
    t = draw(jax.random.split(jax.random.PRNGKey(1), 400))
    pairs = set(zip(t.victim[:, 0].tolist(), t.observed[:, 0].tolist(), strict=True))
    assert len(pairs) == 20 and all(i != j for i, j in pairs)
