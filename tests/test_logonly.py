"""The log-only instruments, their calibration and fused verdict (forensics/logonly/), on small
hand-worked cases, and the fit-models → diagnose --models → evaluate --long path end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from test_rollout_cli import invoke

from forensics.evaluate import roc_auc, wilson_half_width
from forensics.logonly import instruments as I
from forensics.logonly import models as M
from forensics.logonly import verdict as V
from forensics.store import StoreError

# --------------------------------------------------------------------------- CUSUM


def test_cusum_accumulates_a_persistent_deviation_on_a_known_sequence():
    # C^t = max(0, C^{t−1} + s^t − κ), κ = 1: 0, 1, 2, 1, 3; the invalid step carries C
    s = jnp.asarray([0.0, 2.0, 2.0, 0.0, 3.0, 5.0])[None, :, None]
    valid = jnp.asarray([[True, True, True, True, True, False]])
    c = I.cusum(s, jnp.asarray([1.0]), valid)
    np.testing.assert_allclose(c[0, :, 0], [0, 1, 2, 1, 3, 3])
    # a deviation of 0.5 above κ never crosses 1.2 in one step, but does after three
    small = I.cusum(jnp.full((1, 4, 1), 1.5), jnp.asarray([1.0]), jnp.ones((1, 4), bool))
    assert float(small[0, 0, 0]) < 1.2 < float(small[0, 2, 0])


# --------------------------------------------------------------------------- models


def test_ridge_recovers_a_linear_map_with_a_constant_feature():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    x[:, 2] = 1.5  # constant: no scale, absorbed by the intercept
    w_true = np.asarray([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0]], np.float32)
    y = x @ w_true + np.asarray([0.3, -0.1], np.float32)
    w, b = M.ridge(jnp.asarray(x), jnp.asarray(y), jnp.ones(200), 1e-9)
    np.testing.assert_allclose(np.asarray(x @ w + b), y, atol=1e-4)


def world(steps: int, n: int = 3, seed: int = 0) -> jax.Array:
    """Toy observations [1, steps, n, 2 + 2(n−1)]: own position and every teammate's position
    relative to it, the positions random walks (a shared world seen by every agent)."""
    rng = np.random.default_rng(seed)
    pos = np.cumsum(rng.normal(scale=0.1, size=(steps, n, 2)), axis=0)
    obs = [
        np.concatenate([pos[:, i], *[pos[:, k] - pos[:, i] for k in range(n) if k != i]], -1)
        for i in range(n)
    ]
    return jnp.asarray(np.stack(obs, 1)[None], jnp.float32)


def test_crossagent_names_the_agent_that_disagrees_not_its_teammates():
    obs, n = world(400), 3
    act = jnp.zeros((1, 400, n, 2))  # continuous encoding, no information
    m = M.fit_cross(obs, act, jnp.ones((1, 400), bool), 1e-9)
    y, pred = M.cross_residual(m, obs, act)
    m["cross_sigma"] = M.residual_scale(
        M._flat(jnp.broadcast_to(y, pred.shape) - pred), jnp.ones(400), 1e-3
    )
    test = world(30, seed=1)
    faulty = test.at[0, 10:, 1, :2].add(0.5)  # agent 1's own-position sensor is biased
    s, d = I.crossagent_score(m, faulty, act[:, :30])
    s, d = np.asarray(s[0]), np.asarray(d[0])
    assert s[:10].max() < 5  # clean steps: residuals at the floor
    assert (s[10:, 1] > 100).all()  # every teammate's view disagrees with agent 1's
    assert (s[10:, [0, 2]] < 5).all()  # 0 and 2 agree with each other: not framed ...
    assert (d[10:, 0, 1] > 100).all()  # ... although agent 0 predicted from 1 disagrees


def test_decision_gap_is_zero_for_the_greedy_action_and_the_logit_gap_otherwise():
    st = I.Statics(lambda p, o: o * p, True, 3, ("decision",))
    obs = jnp.asarray([[[[2.0, 1.0, -1.0]]]])  # logits = obs: argmax 0, second-best 1
    gap = lambda a: I.decision_score(st, jnp.ones((1, 3)), obs, jnp.asarray([[[a]]]), None).item()
    assert gap(0) == 0.0
    np.testing.assert_allclose([gap(1), gap(2)], [1.0, 3.0], rtol=1e-6)
    masked = I.decision_score(
        st, jnp.ones((1, 3)), obs, jnp.asarray([[[1]]]), jnp.asarray([[[[False, True, True]]]])
    )
    assert masked.item() == 0.0  # the best *legal* action is the greedy one


# --------------------------------------------------------------------------- calibration


def test_joint_thresholds_hold_the_family_wise_rate_at_alpha():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(199, 6))
    m[:, 3] = m[:, 2]  # two statistics that co-vary perfectly count once
    h, fpr = V.thresholds(m, 0.05)
    flagged = np.any(m > h, axis=1)
    assert (flagged.sum() + 1) / (199 + 1) <= 0.05 and fpr == flagged.mean()
    assert h[2] == h[3]
    # split-conformal Bonferroni at α/6 with 199 episodes may flag none: each threshold is its
    # column's maximum; the common rank is less conservative and still within the budget
    assert (h <= m.max(0)).all() and (h < m.max(0)).all() and flagged.sum() >= 5
    with pytest.raises(StoreError, match="need ≥ 19"):
        V.thresholds(m[:10], 0.05)


def test_decide_names_the_first_agent_to_cross_ties_to_the_largest_exceedance():
    # F = 3 statistics: agents 0, 1, 1; thresholds 1, 1, 0 (a decision gap's)
    x = np.zeros((3, 5, 3), np.float32)
    x[0, 3, 0] = 2.0  # agent 0 crosses at 3
    x[0, 2, 1] = 1.5  # agent 1 crosses at 2: first
    x[1, 2, 0] = 4.0  # both at step 2: agent 0 by 4/1 ...
    x[1, 2, 1] = 3.0  # ... over agent 1's 3/1
    x[2, 4, 0] = 0.5  # below threshold: "no failure found"
    cand, t_det, score, agent_t = V.decide(
        jnp.asarray(x),
        jnp.asarray([1.0, 1.0, 0.0]),
        jnp.asarray([0, 1, 1]),
        jnp.ones((3, 5), bool),
        n_agents=2,
    )
    assert cand.tolist() == [1, 0, -1] and t_det.tolist() == [2, 2, -1]
    assert agent_t.tolist() == [[3, 2], [2, 2], [-1, -1]]
    assert float(score[2]) == pytest.approx(0.5)
    # a step after the valid ones is never a detection
    valid = jnp.asarray([[True, True, False, False, False]] * 3)
    cand, *_ = V.decide(jnp.asarray(x), jnp.ones(3), jnp.asarray([0, 1, 1]), valid, n_agents=2)
    assert cand.tolist() == [-1, -1, -1]


def test_availability_names_what_an_instrument_lacks():
    full = {"obs_perceived", "actions", "valid"}
    fitted = set(I.INSTRUMENTS)
    a = I.availability(3, 25, True, full, fitted)
    assert all(v is None for v in a.values())
    a = I.availability(1, 1, False, full, fitted)
    assert "teammates" in a["crossagent"] and "next observations" in a["dynamics"]
    assert a["decision"] is None
    assert "discrete" in I.availability(3, 25, False, full, fitted)["teammate"]
    a = I.availability(3, 25, True, full, None)
    assert all("fit-models" in v for v in a.values())
    assert (
        "no obs_perceived"
        in I.availability(3, 25, True, full - {"obs_perceived"}, fitted)["dynamics"]
    )


def test_models_of_another_checkpoint_or_env_are_refused_naming_both(tmp_path):
    class Store:
        path = tmp_path / "store"

    meta = {
        "checkpoint": {"path": "/runs/a/policy", "sha256": "a" * 64},
        "env": {"name": "simple_spread", "num_agents": 3},
        "store_schema": {},
    }
    other = {"path": "/runs/b/policy", "sha256": "b" * 64}
    with pytest.raises(StoreError) as err:
        M.check_models(meta, tmp_path, other, meta["env"], Store())
    msg = str(err.value)
    assert "/runs/a/policy" in msg and "/runs/b/policy" in msg and "\n" not in msg
    with pytest.raises(StoreError, match="num_agents = 3, not on 5"):
        M.check_models(meta, tmp_path, meta["checkpoint"], {"num_agents": 5}, Store())


def test_auc_and_wilson_on_known_cases():
    assert roc_auc(np.asarray([2.0, 3.0]), np.asarray([0.0, 1.0]))[0] == 1.0
    assert roc_auc(np.ones(4), np.ones(4))[0] == 0.5
    assert 0 < wilson_half_width(10, 10) < 0.2  # 100 % still has an interval


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow  # three rollouts, a fit and three diagnoses: ~1.5 min on a shared 2-core CPU
def test_fit_models_diagnose_and_evaluate_end_to_end(run_dir, tmp_path):
    from test_diagnose import record

    fit = record(run_dir, tmp_path / "fit", "500:540", "attack=none")
    calib = record(run_dir, tmp_path / "calib", "100:140", "attack=none")
    attacked = record(run_dir, tmp_path / "second", "0:3", "attack=action_second_best")
    models = tmp_path / "models"
    r = invoke("fit-models", run_dir, "-c", fit, "-o", models, "fit.teammate_epochs=2")
    assert r.exit_code == 0, r.output
    assert "held-out R²" in r.output and "NLL" in r.output
    meta = json.loads((models / "meta.json").read_text())
    assert meta["data"]["episodes"] == 40 and meta["report"]["fit_seconds"] > 0
    out = tmp_path / "diag"
    r = invoke("diagnose", attacked, "-c", calib, "--models", models, "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "log-only fused" in r.output
    v = pd.read_parquet(out / "verdicts.parquet")
    for col in ("verdict_candidate", "lo_verdict_t_det", "lo_decision_score", "lo_teammate_score"):
        assert col in v
    csv = tmp_path / "long.csv"
    r = invoke("evaluate", out, "--long", csv)
    assert r.exit_code == 0, r.output
    rows = pd.read_csv(csv)
    assert {"verdict", "decision", "chance"} <= set(rows["instrument"])
    assert set(rows["metric"]) >= {"patient0", "fpr", "auc", "delay_median", "delay_p90"}
    # the log-only verdicts read no ground truth: a copy with every other column changed
    # (clean ⇄ attacked, victims, onsets, attack names, ...) gets the same verdicts
    from test_diagnose import SCORED, scrambled_copy

    scrambled = scrambled_copy(attacked, tmp_path / "scrambled", keep=SCORED)
    r = invoke("diagnose", scrambled, "-c", calib, "--models", models, "-o", tmp_path / "ds")
    assert r.exit_code == 0, r.output
    w = pd.read_parquet(tmp_path / "ds" / "verdicts.parquet")
    lo = [c for c in v if c.startswith(("lo_", "verdict_"))]
    pd.testing.assert_frame_equal(v[lo], w[lo])
    # the models refuse another checkpoint's store and seeds shared with the scored store
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "params.msgpack").write_bytes((models / "params.msgpack").read_bytes())
    meta["checkpoint"]["sha256"] = "0" * 64
    (bad / "meta.json").write_text(json.dumps(meta))
    r = invoke("diagnose", attacked, "-c", calib, "--models", bad, "-o", tmp_path / "d2")
    assert r.exit_code == 4 and "fitted on checkpoint" in r.stderr  # cli.EXIT_CODES: store/data
    assert len(r.stderr.strip().splitlines()) == 1
    r = invoke("diagnose", fit, "-c", calib, "--models", models, "-o", tmp_path / "d3")
    assert r.exit_code == 4 and "disjoint seeds" in r.stderr


@pytest.mark.slow
def test_an_instrument_the_store_cannot_feed_is_named_unavailable(run_dir, tmp_path):
    from test_diagnose import record

    calib = record(run_dir, tmp_path / "calib", "100:140", "attack=none")
    attacked = record(run_dir, tmp_path / "worst", "0:2")
    out = tmp_path / "diag"
    r = invoke("diagnose", attacked, "-c", calib, "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "log-only crossagent: no fitted models" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["logonly"]["verdict"].startswith("stage1+stage2")
