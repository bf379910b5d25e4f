"""scripts/gpu_check.sh --dry-run on the CPU: every section of the device check runs at toy
sizes and writes its rows, so the script a GPU session depends on cannot rot unseen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from forensics.results import read_rows

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_a_row_for_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [ROOT / "scripts" / "gpu_check.sh", "--dry-run", "--commit", "test"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = read_rows(tmp_path / "gpu_rows.csv")
    got = {(r["instrument"], r["metric"]) for r in rows}
    for expected in [
        ("numerics:measure/paper", "within_tolerance@highest"),
        ("rollout", "episodes_per_s"),
        ("critic_geometry", "hvp_per_s"),
        ("diagnose:paper", "episodes_per_s"),
        ("diagnose:default", "compile_measure_s"),
        ("logonly:verdict", "episodes_per_s"),
        ("train", "env_steps_per_s"),
    ]:
        assert expected in got, (expected, sorted(got))
    assert {r["algo"] for r in rows if r["instrument"] == "train"} == {"maddpg", "hatrpo"}
    assert all(float(r["value"]) > 0 for r in rows if r["metric"].endswith("_per_s"))
    numerics = [float(r["value"]) for r in rows if r["metric"] == "within_tolerance@highest"]
    assert numerics and all(v == 100.0 for v in numerics)
    assert all(r["device"].startswith("dry-run cpu") and r["commit"] == "test" for r in rows)
    assert (tmp_path / "bench.log").read_text().count("rows:") == 1
