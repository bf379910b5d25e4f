"""Fixtures shared by several test modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SMOKE_TRAIN = ["algo=maddpg_smoke", "train.total_env_steps=200", "train.eval_episodes=0",
               "train.progress=false"]  # fmt: skip


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A run trained by the installed ``forensics train`` (maddpg_smoke, one 200-step chunk):
    the checkpoint the rollout and diagnose end-to-end tests record and diagnose."""
    out = tmp_path_factory.mktemp("runs")
    forensics = Path(sys.executable).with_name("forensics")
    result = subprocess.run(
        [forensics, "train", f"out_dir={out}", *SMOKE_TRAIN],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out / "simple_spread_3-maddpg-seed0"
