"""Sweeps through Hydra's submitit launchers, end to end through the ``forensics`` command:
a Slurm submission (one array task per combination, resources from the launcher config),
local submitit sweeps whose runs ``evaluate-policy --sweep`` tabulates, and a preempted job
that submitit requeues and that resumes from its newest checkpoint."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

FORENSICS = str(Path(sys.executable).with_name("forensics"))
STEPS_PER_CHUNK = 200  # maddpg_smoke: 2 iterations × 4 envs × 25 steps
LOCAL = ["-m", "hydra/launcher=submitit_local", "algo=maddpg_smoke"]


def forensics(*args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [FORENSICS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / "checkpoints").is_dir())


def committed_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def chunks(run_dir: Path) -> list[int]:
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["chunk"] for row in rows]


def job_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted((sweep / ".submitit").glob("*/*_log.out")))


def test_slurm_sweep_submits_one_array_task_per_combination(tmp_path):
    """Everything up to the cluster: no Slurm here, so stand-in ``srun``/``sbatch`` refuse
    the submission; submitit has written the sbatch script and one pickled job per sweep
    point by then."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).write_text(
            f"#!/bin/sh\necho 'stand-in {tool}: no Slurm here' >&2\nexit 1\n"
        )
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = forensics(
        "train",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.mem_gb=32",
        f"out_dir={tmp_path / 'runs'}",
        "algo=maddpg_smoke",
        "seed=0,1",
        "env=simple_spread_3,simple_spread_5",
        env=env,
        timeout=120,
    )
    assert result.returncode != 0 and "stand-in sbatch: no Slurm here" in result.stderr

    submitit = tmp_path / "runs" / "sweeps" / "default" / ".submitit"
    (script,) = submitit.glob(".submission_file_*.sh")
    directives = set(re.findall(r"^#SBATCH (\S+)$", script.read_text(), re.M))
    # one array job of 4 tasks; resources from configs/hydra/launcher/slurm.yaml + overrides
    assert {
        "--array=0-3%4",
        "--partition=gpu",
        "--mem=32GB",
        "--gpus-per-node=1",
        "--cpus-per-task=4",
        "--time=240",
        "--signal=USR2@120",
    } <= directives

    jobs = [pickle.loads(p.read_bytes()) for p in sorted(submitit.glob("*.pkl"))]
    points = {tuple(o for o in job.args[0] if o.startswith(("seed=", "env="))) for job in jobs}
    expected = itertools.product(
        ("seed=0", "seed=1"), ("env=simple_spread_3", "env=simple_spread_5")
    )
    assert len(jobs) == 4 and points == set(expected)
    # what a job runs: our Hydra task, and it may be requeued 5 times after time-outs
    assert {job.function.task_function.__module__ for job in jobs} == {"cli.train"}
    assert {job._timeout_countdown for job in jobs} == {5}


def run_local_sweep(out: Path, *grid: str) -> Path:
    """A tiny local submitit sweep (1 chunk per job, a 16-episode final evaluation)."""
    result = forensics(
        "train",
        *LOCAL,
        f"out_dir={out}",
        "sweep_name=grid",
        *grid,
        f"train.total_env_steps={STEPS_PER_CHUNK}",
        "train.eval_episodes=16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "sweeps" / "grid"


def check_sweep(sweep: Path, seeds: list[int], envs: list[str]) -> pd.DataFrame:
    """Every job trained into its own directory of the sweep; the aggregated table."""
    jobs = job_dirs(sweep)
    assert len(jobs) == len(seeds) * len(envs)
    for job in jobs:
        assert committed_steps(job) == [STEPS_PER_CHUNK]
        command = yaml.safe_load((job / "run.yaml").read_text())["command"]
        assert command.startswith("forensics train -m hydra/launcher=submitit_local ")

    table = forensics("evaluate-policy", "--sweep", str(sweep), "--episodes", "16")
    assert table.returncode == 0, table.stderr
    print(table.stdout)  # the aggregated table (pytest -s shows it)
    for env in envs:
        assert re.search(rf"{env}\s+maddpg\s+{len(seeds)}\s+-?\d", table.stdout)
    runs = pd.read_parquet(sweep / "evaluation.parquet")
    assert sorted(zip(runs["env"], runs["seed"], strict=True)) == sorted(
        itertools.product(envs, seeds)
    )
    assert (runs["env_steps"] == STEPS_PER_CHUNK).all() and runs["mean_return"].lt(0).all()
    assert runs["ci95"].gt(0).all()
    return runs


def test_local_sweep_runs_every_job_and_aggregates(tmp_path):
    sweep = run_local_sweep(tmp_path, "seed=0,1")
    check_sweep(sweep, [0, 1], ["simple_spread_3"])


@pytest.mark.slow
def test_local_sweep_2x2_runs_every_job_and_aggregates(tmp_path):
    sweep = run_local_sweep(tmp_path, "seed=0,1", "env=simple_spread_3,simple_spread_5")
    check_sweep(sweep, [0, 1], ["simple_spread_3", "simple_spread_5"])


def _submitit_task(folder: Path) -> int | None:
    """pid of the process that runs a submitit job submitted under ``folder``."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(str(folder).encode() in c for c in cmd):
            return int(proc.name)
    return None


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    """SIGUSR2 is what Slurm sends before preempting a job (and what the local executor
    sends before its time limit): submitit calls the launcher's checkpoint hook, requeues
    the job with the same overrides, and the requeued job resumes in the same directory."""
    total = 20
    args = [
        "train",
        *LOCAL,
        f"out_dir={tmp_path}",
        f"train.total_env_steps={total * STEPS_PER_CHUNK}",
        "train.checkpoint_every_chunks=1",
        "train.eval_episodes=0",
        "train.progress=false",
    ]
    proc = subprocess.Popen(
        [FORENSICS, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    sweep = tmp_path / "sweeps" / "default"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if sweep.is_dir() and any(committed_steps(j) for j in sweep.iterdir()):
            break
        time.sleep(0.05)
    task = _submitit_task(sweep)
    assert task is not None, "the job finished or never started"
    os.kill(task, signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]

    (job,) = job_dirs(sweep)
    log = job_logs(sweep)
    assert "this job is preempted" in log and "Requeued job" in log
    resumed = re.search(r"Resuming .* from env step ([\d,]+)", log)
    assert resumed, log[-3000:]
    resumed_at = int(resumed.group(1).replace(",", ""))
    assert STEPS_PER_CHUNK <= resumed_at < total * STEPS_PER_CHUNK
    assert chunks(job) == list(range(1, total + 1))  # none lost or repeated
    assert committed_steps(job)[-1] == total * STEPS_PER_CHUNK
