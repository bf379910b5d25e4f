"""forensics/logonly/fault_class.py on hand-worked cases: which side crossed, and which
readings disagree."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from forensics.logonly import fault_class as FC


def test_window_max_reads_only_the_verdicts_window_of_valid_steps():
    r = jnp.asarray([[1.0, 9.0, 2.0, 3.0, 8.0]])
    valid = jnp.asarray([[True, True, True, False, True]])
    got = FC.window_max(r, jnp.asarray([2]), valid, 3)  # steps 2, 3 (invalid), 4
    assert float(got[0]) == 8.0
    assert float(FC.window_max(r, jnp.asarray([2]), valid, 2)[0]) == 2.0
    assert float(FC.window_max(r, jnp.asarray([-1]), valid, 3)[0]) == -np.inf


def test_side_names_the_instrument_family_that_crossed_for_patient_zero():
    # statistics: crossagent of agent 0, decision of agent 0, decision of agent 1
    inst_of, agent_of = jnp.asarray([0, 1, 1]), jnp.asarray([0, 0, 1])
    h = jnp.asarray([1.0, 2.0, 1.0])
    x = jnp.zeros((3, 4, 3))
    x = x.at[0, 1, 0].set(5.0).at[0, 2, 1].set(1.0)  # sensor 5, action 0.5 → sensor
    x = x.at[1, 2, 1].set(8.0).at[1, 1, 0].set(0.5)  # action 4, sensor 0.5 → action
    x = x.at[1, 2, 2].set(100.0)  # agent 1's decision: not Patient-0's evidence
    valid = jnp.ones((3, 4), bool)
    cand, t_det = jnp.asarray([0, 0, -1]), jnp.asarray([1, 1, -1])
    code, margin, sensor, action = FC.side(x, h, inst_of, agent_of, cand, t_det, valid, window=2)
    assert [FC.CLASSES[c] for c in np.asarray(code)] == ["sensor", "action", "none"]
    np.testing.assert_allclose(np.asarray(margin)[:2], [1.0, np.log10(8.0)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sensor)[:2], [5.0, 0.5])
    np.testing.assert_allclose(np.asarray(action)[:2], [0.5, 4.0])


def test_readings_use_the_cross_agent_window_and_own_dynamics_at_detection_only():
    # z [2 (cross, dyn), B=1, T=4, N=2, G=3]; Patient-0 = agent 1 detected at t = 1
    z = np.zeros((2, 1, 4, 2, 3), np.float32)
    z[0, 0, 2, 1, 1] = 3.0  # cross-agent, group 1, inside the window: counts
    z[0, 0, 2, 0, 0] = 9.0  # another agent: ignored
    z[1, 0, 1, 1, 0] = 1.5  # own-dynamics at t_det, group 0: counts
    z[1, 0, 2, 1, 2] = 7.0  # own-dynamics after t_det (its inputs are faulty by then): ignored
    h = np.ones((2, 3), np.float32)
    ratio = np.asarray(
        FC.inconsistent_groups(
            jnp.asarray(z), jnp.asarray(h), jnp.asarray([1]), jnp.asarray([1]),
            jnp.ones((1, 4), bool), window=3,
        )
    )  # fmt: skip
    np.testing.assert_allclose(ratio, [[1.5, 3.0, 0.0]])
    assert FC.readings(ratio, ["own", "landmarks", "teammates"]) == [["landmarks", "own"]]


def test_group_thresholds_are_bonferroni_quantiles_of_clean_maxima():
    rng = np.random.default_rng(0)
    clean = rng.exponential(size=(4000, 2, 4))
    h = FC.group_thresholds(clean, alpha=0.2)
    assert h.shape == (2, 4)
    exceed = (clean > h[None]).any(axis=2).mean(axis=0)  # per family, any of the 4 groups
    assert np.all(exceed <= 0.2 + 0.02)
