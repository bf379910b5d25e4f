"""The paper's protocol point by point (forensics/paper.py, agents/replay_band.py), each on a
small case worked by hand; fast (tiny nets, a few episodes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_team

from agents import attacks
from agents import rollout as R
from agents.replay_band import band_moments, make_band, make_replays
from configs.schema import ConfigError
from forensics import paper as P
from forensics.stage1 import Stage1Config, stage1_scores

# ------------------------------------------------------------------ replays and the band


REPLAYS = 4


@functools.cache
def replays():
    env, team, ap, _ = random_team(3, False)
    return make_replays(env, team, REPLAYS)


def test_noiseless_replay_is_the_recorded_clean_episode_and_noise_keeps_it_close():
    env, team, ap, _ = random_team(3, False)
    keys = R.seed_keys(np.arange(3))
    clean = R.make_rollout(env, team, attacks.Attack(name="none"))(
        ap, None, keys, attacks.clean_target((3,))
    )
    rep = replays()(ap, keys, 0.0)  # [S, R, T, N, ...]
    assert rep.obs.shape == (3, 4, env.spec.episode_length, 3, env.spec.obs_dim)
    for r in range(4):  # same seed → same initial state and, without noise, the same episode
        assert np.array_equal(rep.obs[:, r], clean.obs_true)
        assert np.array_equal(rep.actions[:, r], clean.actions)
    noisy = replays()(ap, keys, 1e-4)  # the same compiled program: noise is traced
    d0 = np.abs(noisy.obs[:, :, 0] - rep.obs[:, :, 0])  # step 0: only the noise
    assert 0 < d0.max() < 1e-3 and 5e-5 < d0.std() < 2e-4
    assert not np.array_equal(noisy.obs[:, 0], noisy.obs[:, 1])  # fresh noise per replay


def test_band_moments_are_the_replay_mean_and_population_std():
    x = jnp.asarray([1.0, 2.0, 3.0, 10.0]).reshape(1, 4, 1, 1)  # S=1, R=4, T=1, N=1
    valid = jnp.asarray([True, True, True, False]).reshape(1, 4, 1)  # replay 4 ended
    mu, sigma, count = band_moments(x, valid)
    assert float(mu[0, 0, 0]) == pytest.approx(2.0)
    assert float(sigma[0, 0, 0]) == pytest.approx(np.std([1.0, 2.0, 3.0]))  # ddof 0
    assert int(count[0, 0]) == 3


def test_band_of_the_paper_statistic_matches_stage1_on_the_replays():
    env, team, ap, _ = random_team(3, False)
    cfg = Stage1Config(probe="paper", target="greedy", window=5, retake_argmax=True)
    stat = lambda p, rep: (stage1_scores(team.actor_apply, p, rep.obs, rep.avail, cfg=cfg).smooth,)
    keys = R.seed_keys(np.arange(2))
    band = make_band(env, team, stat, REPLAYS)(ap, ap, keys, 1e-4)
    rep = replays()(ap, keys, 1e-4)
    flat = jax.tree_util.tree_map(lambda a: a.reshape(2 * REPLAYS, *a.shape[2:]), rep)
    x = np.asarray(stat(ap, flat)[0]).reshape(2, REPLAYS, *band.mu[0].shape[1:])
    np.testing.assert_allclose(band.mu[0], x.mean(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(band.sigma[0], x.std(1), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ stage 1


def test_paper_probe_retakes_the_argmax_at_o_plus_eta():
    # one agent, O = 1, two actions: logits (cos o − 0.999, 0). At o = 0.01 action 0 wins by
    # ~1e-3, g = ∇ log π(0|o) ≈ −0.005, so η = ε·sign(g)/|g| ≈ −2 and at o + η ≈ −1.99 the
    # argmax is action 1: the code's statistic uses log π(1|o+η), the held-τ one log π(0|o+η)
    apply = lambda p, o: jnp.stack([jnp.cos(o[0]) - 0.999 + 0 * p, jnp.zeros(())])
    o = np.asarray([0.01], np.float32)
    params, obs = jnp.zeros((1,)), jnp.asarray(o).reshape(1, 1, 1, 1)
    lp = lambda x: np.log(
        np.exp([np.cos(x[0]) - 0.999, 0.0]) / np.exp([np.cos(x[0]) - 0.999, 0.0]).sum()
    )
    p0 = np.exp(lp(o)[0])
    g = (1 - p0) * -np.sin(o[0])  # d/do log softmax_0 = (1 − p0)·f'(o)
    eta = 0.01 * np.sign(g) / abs(g)
    assert np.argmax(lp(o)) == 0 and np.argmax(lp(o + eta)) == 1
    held = abs(lp(o + eta)[0] - lp(o)[0] - g * eta)
    retaken = abs(lp(o + eta)[1] - lp(o)[0] - g * eta)
    cfg = Stage1Config(probe="paper", window=1)
    a = stage1_scores(apply, params, obs, cfg=cfg)
    b = stage1_scores(
        apply, params, obs, cfg=Stage1Config(probe="paper", window=1, retake_argmax=True)
    )
    assert float(a.raw[0, 0, 0]) == pytest.approx(held, rel=1e-3)
    assert float(b.raw[0, 0, 0]) == pytest.approx(retaken, rel=1e-3)
    assert abs(held - retaken) > 0.1


def test_band_flags_k_sigma_isclose_and_floor():
    mu = jnp.asarray([1.0, 1.0, 100.0, 0.0]).reshape(1, 4, 1)
    sigma = jnp.asarray([0.1, 0.1, 0.0, 0.0]).reshape(1, 4, 1)
    x = jnp.asarray([1.25, 1.15, 100.0005, 5e-7]).reshape(1, 4, 1)
    # t0: 0.25 > 2·0.1 → flag; t1: 0.15 < 0.2 → no; t2: σ = 0 but isclose (|dev| = 5e-4 ≤
    # 1e-5 + 1e-5·100 = 1.01e-3) → no; t3: dev 5e-7 ≤ atol → no
    assert P.band_flags(x, mu, sigma, 2.0)[0, :, 0].tolist() == [True, False, False, False]
    # the same dev 5e-7 above a zero band is a flag when not close (atol shrinks): with a
    # larger x it is, and the HATRPO floor 1e-6 stops a dev of 2e-6 at K = 3
    x2 = jnp.asarray([0.0, 0.0, 0.0, 2e-5]).reshape(1, 4, 1)
    assert bool(P.band_flags(x2, mu * 0, sigma * 0, 2.0)[0, 3, 0])
    assert not bool(P.band_flags(x2, mu * 0, sigma * 0, 3.0, sigma_floor=1e-5)[0, 3, 0])
    valid = jnp.asarray([[False, True, True, True]])
    assert not bool(P.band_flags(x, mu, sigma, 2.0, valid=valid)[0, 0, 0])


def test_earliest_flag_is_the_candidate_and_ties_go_to_the_largest_raw_deviation():
    flags = np.zeros((2, 4, 3), bool)
    flags[0, 2, [0, 2]] = True  # agents 0 and 2 first flagged at t = 2
    flags[0, 3, 1] = True
    raw_dev = np.zeros((2, 4, 3), np.float32)
    raw_dev[0, 2] = [0.5, 9.0, 0.7]  # agent 1 is not among the earliest: its 9 is ignored
    e = P.earliest_candidate(jnp.asarray(flags), jnp.asarray(raw_dev))
    assert e.t_det.tolist() == [2, -1] and e.candidate.tolist() == [2, -1]
    assert e.earliest[0].tolist() == [True, False, True] and not bool(e.earliest[1].any())
    assert e.agent_t.tolist() == [[2, 3, 2], [-1, -1, -1]]
    raw_dev[0, 2] = [0.7, 0.0, 0.7]  # full tie: the lowest index (the code's strict >)
    assert int(P.earliest_candidate(jnp.asarray(flags), jnp.asarray(raw_dev)).candidate[0]) == 0


# ------------------------------------------------------------------ stage 2


def _geometry(T=8, N=3):
    return np.zeros((1, T, N, N), np.float32), np.zeros((1, T, N, N), np.float32)


def test_maddpg_traceback_scores_count_of_positive_d_times_g_at_t_det():
    G, D = _geometry()
    t_det, cand = jnp.asarray([6]), jnp.asarray([2])
    # row c = 2: u = 0 has D > 0 on 2 window steps (t = 2..6), G at t_det 1.0 → score 2;
    # u = 1 has D > 0 on 1 step, G at t_det 3.0 → score 3: the code hops to 1, not 0
    D[0, [3, 5], 2, 0] = 1.0
    D[0, 1, 2, 0] = 1.0  # t = 1 is outside [t_det − 4, t_det]
    D[0, 6, 2, 1] = 1.0  # t = t_det is inside (closed window)
    G[0, 6, 2, 0], G[0, 6, 2, 1] = 1.0, 3.0
    head, chain = P.traceback_maddpg(jnp.asarray(G), jnp.asarray(D), t_det, cand)
    # row c = 1: nobody has D > 0 → the best score is 0, rate 0 → stop at 1
    assert int(head[0]) == 1 and chain[0].tolist() == [2, 1, -1]
    # row 1 → 0 with rate > 0 but G = 0 (score 0): still the first best score, and it hops
    D[0, 4, 1, 0] = 1.0
    head, chain = P.traceback_maddpg(jnp.asarray(G), jnp.asarray(D), t_det, cand)
    assert chain[0].tolist() == [2, 1, 0] and int(head[0]) == 0
    # a cycle stops the chain: row 0 → 2 (already on it)
    D[0, 4, 0, 2], G[0, 6, 0, 2] = 1.0, 5.0
    head, chain = P.traceback_maddpg(jnp.asarray(G), jnp.asarray(D), t_det, cand)
    assert chain[0].tolist() == [2, 1, 0] and int(head[0]) == 0
    # no detection: no chain
    head, chain = P.traceback_maddpg(jnp.asarray(G), jnp.asarray(D), jnp.asarray([-1]), -cand // 2)
    assert int(head[0]) == -1


def test_paper_geometry_is_taken_at_the_pre_attack_actions_of_the_attacked_run():
    from forensics.diagnose import Instruments
    from forensics.stage2 import critic_geometry

    env, team, ap, cp = random_team(3, False)
    attack = attacks.Attack(name="worst_action")
    target = attacks.Target(
        victim=jnp.asarray([0]), observed=jnp.asarray([1]), start=jnp.asarray([2]),
        window=jnp.asarray([5]),
    )  # fmt: skip
    ep = R.make_rollout(env, team, attack)(ap, cp, R.seed_keys(np.arange(1)), target)
    inst = Instruments(team.actor_apply, team.critic_apply, True, 5, P.PAPER_STAGE1)
    _, _, G, D = P.paper_measure(inst, {"actor": ap, "critic": cp}, ep.obs_perceived, ep.avail)
    onehot = lambda a: jax.nn.one_hot(a, 5, dtype=jnp.float32)
    pre = critic_geometry(team.critic_apply, cp, ep.obs_true, onehot(ep.clean_actions))
    taken = critic_geometry(team.critic_apply, cp, ep.obs_true, onehot(ep.actions))
    np.testing.assert_allclose(G, pre.G, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(D, pre.D, rtol=1e-4, atol=1e-7)
    assert not np.allclose(G[0, 2:7], taken.G[0, 2:7])  # not at the worst actions taken


def test_hatrpo_traceback_window_excludes_t_det_and_rate_decides_before_g():
    G, D = _geometry()
    t_det, cand = jnp.asarray([6]), jnp.asarray([0])
    D[0, 6, 0, 1] = 1.0  # at t_det: outside the half-open window [2, 6)
    D[0, [2, 3], 0, 2] = 1.0  # rate 2/4 for u = 2
    G[0, 6, 0, 1], G[0, 6, 0, 2] = 10.0, 0.1  # G would favour 1; the rate decides
    head, chain = P.traceback_hatrpo(jnp.asarray(G), jnp.asarray(D), t_det, cand)
    assert chain[0].tolist() == [0, 2, -1] and int(head[0]) == 2
    D[0, [4, 5], 0, 1] = 1.0  # now rates tie at 2/4: G at t_det breaks the tie → 1
    head, chain = P.traceback_hatrpo(jnp.asarray(G), jnp.asarray(D), t_det, cand)
    assert chain[0].tolist()[:2] == [0, 1]


def test_search_horizon_and_pairs_without_the_required_sign_are_skipped():
    assert P.search_horizon("maddpg", 25) == 7  # ceil(6.25), not floor
    assert P.search_horizon("hatrpo", 25) == 25
    D = np.zeros((3, 25, 3, 3), np.float32)
    D[0, 6, 1, 0] = 1.0  # pair 0 → 1: D > 0 at t = 6 < 7
    D[1, 7, 1, 0] = 1.0  # t = 7 is outside the MADDPG horizon
    D[2, 3, 1, 0] = -1.0  # D < 0 only: a low-influence onset exists, a high one does not
    victim, observed = np.zeros(3, int), np.ones(3, int)
    high = np.asarray([True, True, True])
    assert P.onset_eligible(D, victim, observed, high, 7).tolist() == [True, False, False]
    assert P.onset_eligible(D, victim, observed, ~high, 7).tolist() == [False, False, True]
    assert P.onset_eligible(D, victim, observed, high, 25).tolist() == [True, True, False]


# ------------------------------------------------------------------ scoring


def test_paper_scoring_counts_ties_gates_stage2_on_ground_truth_and_reports_strict():
    # five episodes, victim 0, attack start 3
    earliest = np.asarray(
        [[1, 1, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], bool
    )  # tie incl. victim | wrong | wrong | victim, but early | nothing
    t_det = np.asarray([3, 4, 4, 2, -1])
    cand = np.asarray([1, 1, 1, 0, -1])  # the tie-break picked agent 1 in episode 0
    head = np.asarray([1, 0, 2, 0, -1])  # traceback heads
    victim, start = np.zeros(5, int), np.full(5, 3)
    s = P.paper_scoring(earliest, t_det, cand, head, victim, start, "maddpg")
    assert s.stage1.tolist() == [True, False, False, False, False]
    assert s.threshold_failure.tolist() == [False, False, False, True, False]
    # episode 1: Stage 1 wrong after the start → Stage 2 runs (oracle) and finds 0; episode
    # 3 is a threshold failure: Stage 2 does not rescue it even though its head is 0
    assert s.oracle_gated.tolist() == [True, True, False, False, False]
    assert s.strict.tolist() == [False, False, False, False, False]
    assert s.detected.tolist() == [True, True, True, True, False]
    # HATRPO: no start condition
    h = P.paper_scoring(earliest, t_det, cand, head, victim, start, "hatrpo")
    assert h.stage1.tolist() == [True, False, False, True, False]


def test_reference_config_is_checked():
    assert P.ReferenceConfig.from_mapping({"kind": "replay"}).replays == 100
    with pytest.raises(ConfigError, match="forensics.reference.replays"):
        P.ReferenceConfig.from_mapping({"kind": "replay", "replays": 1})
    with pytest.raises(ConfigError, match="forensics.reference.bogus"):
        P.ReferenceConfig.from_mapping({"bogus": 1})


# ------------------------------------------------------------------ end to end (CLI)


@pytest.mark.slow
def test_diagnose_replay_end_to_end(run_dir, tmp_path):
    """rollout → diagnose forensics=replay (4 replays per seed) → evaluate_replay: every
    episode gets a verdict, only μ, σ per (seed, step, agent) are kept, and a calibration
    store sharing a seed with the scored one is refused in one line before anything is
    written."""
    import json

    from test_rollout_cli import invoke

    def record(out, seeds, *extra):
        result = invoke("rollout", run_dir, "-o", out, "--seeds", seeds, "--no-progress", *extra)
        assert result.exit_code == 0, result.output
        return out

    worst = record(tmp_path / "worst", "0:2", "attack.search_fraction=0.28")
    clean = record(tmp_path / "clean", "100:140", "attack=none")
    args = ["forensics=replay", "forensics.reference.replays=4", "forensics.batch_episodes=32"]
    out = tmp_path / "diag"
    result = invoke("diagnose", worst, "-c", clean, "--out", out, "--no-progress", *args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setting"] == "replay-referenced"
    verdicts = __import__("pandas").read_parquet(out / "verdicts.parquet")
    assert len(verdicts) == 2 * 13 and set(verdicts["seed"]) == {0, 1}
    with np.load(out / "band.npz") as band:
        assert band["paper_mu"].shape == band["paper_sigma"].shape == (2, 25, 3)
        assert band["ours_mu"].shape == (2, 25, 3) and (band["count"] == 4).all()
    rows, counts = P.evaluate_replay(out)
    assert counts["attacked"] == 24 and counts["search_horizon"] == 7
    assert {r["setting"] for r in rows} == {"paper-protocol", "replay-referenced"}
    shared = record(tmp_path / "shared", "1:3", "attack=none")
    bad = invoke("diagnose", worst, "-c", shared, "--out", tmp_path / "bad", "--no-progress", *args)
    assert bad.exit_code != 0 and "seed" in bad.output and not (tmp_path / "bad").exists()


def test_replay_residual_is_thresholded_as_is_with_every_clean_episode_setting_it():
    from forensics.calibration import budget_calibration, identity_normaliser, standardise

    # 40 clean residual episodes (T = 2, N = 1) whose largest values are 0, 1, …, 39: with a
    # fixed identity normaliser all 40 set the threshold; α = 5 %: the largest F with
    # (F + 1)/41 ≤ 0.05 is 1, so the threshold is the 2nd largest (38) and 1 of 40 is flagged
    x = np.zeros((40, 2, 1), np.float32)
    x[:, 1, 0] = np.arange(40)
    cal = budget_calibration(jnp.asarray(x), 0.05, norm=identity_normaliser(2, 1))
    assert float(cal.threshold[0]) == 38.0 and cal.calib_fpr == pytest.approx(1 / 40)
    z = standardise(jnp.asarray([[[0.5], [-3.0]]]), cal.norm, jnp.ones((1, 2), bool))
    assert z[0, :, 0].tolist() == [0.5, -3.0]  # z is the residual itself: no clip, no scale
