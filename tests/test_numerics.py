"""The stored CPU values of tests/numerics.py's cases, reproduced by this backend within
float32 tolerance (on a GPU through scripts/gpu_check.sh; here on the CPU, where a change of
what is computed, or of how XLA rounds it, shows up)."""

from __future__ import annotations

import numerics
import numpy as np


def test_every_case_matches_the_stored_cpu_values_within_float32_tolerance():
    stored, ref = numerics.load()
    got = numerics.outputs(stored)
    assert set(got) == set(ref), "outputs changed: regenerate with tests/numerics.py --write"
    bad = [r for r in numerics.compare(got, ref) if not r["ok"]]
    assert not bad, [(r["key"], r["max_abs_diff"], r["worst_over_tolerance"]) for r in bad]
    # the cases measure something: curvature (HVPs) and training moved the numbers
    assert np.abs(ref["measure/paper/D"]).max() > 0 and np.abs(ref["measure/default/X"]).max() > 0
    leaf = "['params']['MLP_0']['Dense_0']['kernel']"
    moved = ref[f"train_maddpg/params/['actor']{leaf}"]
    start = stored[f"train_maddpg/state/.learner.actor_params{leaf}"]
    assert np.abs(moved - start).max() > 0


def test_comparison_flags_a_value_outside_its_tolerance_and_a_lost_nan():
    ref = {"measure/x": np.array([1.0, 1e-4, 2.0]), "train_a/y": np.array([1.0, 2.0])}
    rtol, atol = numerics.tolerance("measure/x")
    inside = {"measure/x": ref["measure/x"] * (1 + 0.5 * rtol), "train_a/y": ref["train_a/y"]}
    assert all(r["ok"] for r in numerics.compare(inside, ref))
    outside = dict(inside, **{"measure/x": np.array([1.0, 1e-4 + 3 * atol, 2.0])})
    assert [r["ok"] for r in numerics.compare(outside, ref)] == [False, True]
    nan = dict(inside, **{"train_a/y": np.array([1.0, np.nan])})
    assert [r["ok"] for r in numerics.compare(nan, ref)] == [True, False]
