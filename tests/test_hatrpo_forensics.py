"""Forensics on a HATRPO run: `forensics fit-probe` fits the post-hoc probe critics, then
`rollout` and `diagnose` work on the run unchanged (issue 5: the paper's HATRPO setting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app

TRAIN = ["algo=hatrpo_smoke", "train.total_env_steps=200", "train.eval_episodes=0",
         "train.progress=false"]  # fmt: skip
PROBE = ["probe.episodes=64", "probe.epochs=3", "probe.hidden=[16,16]"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def hatrpo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    forensics = Path(sys.executable).with_name("forensics")
    result = subprocess.run([forensics, "train", f"out_dir={out}", *TRAIN],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out / "simple_spread_3-hatrpo-seed0"


def test_rollout_needs_the_probe_then_diagnose_runs_on_it(hatrpo_run, tmp_path):
    store, clean = tmp_path / "worst", tmp_path / "clean"
    missing = invoke("rollout", hatrpo_run, "-o", store, "--seeds", "0:2", "--no-progress")
    assert missing.exit_code == 4 and "forensics fit-probe" in missing.output  # a missing file
    assert not store.exists()

    fitted = invoke("fit-probe", hatrpo_run, *PROBE)
    assert fitted.exit_code == 0, fitted.output
    assert "held-out R²" in fitted.output
    assert (hatrpo_run / "probe_critic").is_dir()

    for out, extra in ((store, ["--seeds", "0:2"]), (clean, ["--seeds", "100:140", "attack=none"])):
        r = invoke("rollout", hatrpo_run, "-o", out, "--no-progress", *extra)
        assert r.exit_code == 0, r.output
    diag = invoke("diagnose", store, "-c", clean, "--run", hatrpo_run, "--no-progress")
    assert diag.exit_code == 0, diag.output
    summary = json.loads((store / "diagnosis" / "summary.json").read_text())
    assert summary["algo"] == "hatrpo" and summary["paper_k"] == 3.0  # the paper's K for HATRPO
    verdicts = pd.read_parquet(store / "diagnosis" / "verdicts.parquet")
    assert len(verdicts) == 2 * (1 + 3 * 2 * 2) and (verdicts["status"] == "ok").all()
    scores = np.load(store / "diagnosis" / "scores.npz")
    assert np.isfinite(scores["q"]).all() and np.abs(scores["q"]).max() > 0  # the probe's Q


def test_bad_probe_setting_is_one_line_and_fits_nothing(hatrpo_run):
    r = invoke("fit-probe", hatrpo_run, "probe.bogus=1")
    assert r.exit_code == 3 and r.output.startswith("error: probe.bogus")  # a config error
