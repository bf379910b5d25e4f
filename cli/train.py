"""``forensics train [OVERRIDES...] [-m]``: compose the Hydra config, validate, train."""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from omegaconf import DictConfig

from cli.hydra_entry import run_hydra

HELP = """Train (or resume) a policy; the config is composed by Hydra from `configs/`.

Arguments are Hydra overrides: pick a config group with `group=option`
(`env=simple_spread_5`, `algo=maddpg`, `attack=none`) and set any value with `key=value`
(`seed=3`, `train.total_env_steps=200000`, `algo.lr_actor=0.001`). A misspelt group or key
fails with Hydra's message; bad values (negative steps, fewer than 2 agents) fail before
any work starts.

The run directory is `runs/<env>_<N>-<algo>-seed<seed>` (`out_dir=` and `run_name=`
change it). It keeps Hydra's `.hydra/` (composed config, overrides), `run.yaml` (resolved
config, code version, seed), `metrics.jsonl` (one line per chunk), `checkpoints/` (Orbax)
and `evaluation.json`. Re-running the same command resumes from the newest checkpoint; a
checkpoint made with a different env/algo/seed is refused, naming the field.

With `-m`/`--multirun`, comma-separated values sweep, one run per combination, into
`runs/sweeps/<sweep_name>/<overrides>`; `forensics evaluate-policy --sweep
runs/sweeps/<sweep_name>` tabulates them. Other Hydra flags pass through: `--cfg job` prints
the composed config without training, `hydra/launcher=...` picks a launcher:
`hydra/launcher=slurm` submits one Slurm job per combination (resources in
`configs/hydra/launcher/slurm.yaml`, or `hydra.launcher.partition=...` etc.),
`hydra/launcher=submitit_local` runs the jobs as local processes. A job that Slurm
preempts or times out is requeued and resumes from its newest checkpoint.

Examples:

* `forensics train`
* `forensics train env=simple_spread_5 seed=3 train.total_env_steps=500000`
* `forensics train -m seed=0,1,2 sweep_name=seeds`
* `forensics train -m hydra/launcher=slurm hydra.launcher.partition=gpu seed=0,1,2,3`
* `forensics train --cfg job algo.lr_actor=0.001`
"""


def job_command(hydra_cfg: DictConfig) -> str:
    """The command that re-runs this job into the same directory: ``forensics train``,
    ``-m`` for a sweep job (whatever process runs it, e.g. a Slurm job), the Hydra overrides
    given (launcher) and the job's own overrides."""
    from hydra.types import RunMode

    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    given = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]
    return shlex.join(
        ["forensics", "train", *(["-m"] if sweep else []), *given, *hydra_cfg.overrides.task]
    )


def _drop_empty_log(output_dir: Path) -> None:
    """Hydra opens ``<run>/train.log`` (and creates the run directory) before the task
    runs; a refused invocation leaves neither behind when they are empty."""
    log = output_dir / "train.log"
    if log.is_file() and log.stat().st_size == 0:
        log.unlink()
    with contextlib.suppress(OSError):  # only if now empty
        output_dir.rmdir()


def task(cfg: DictConfig) -> None:
    """Hydra task: validate first, then train in Hydra's output directory.

    A ``ConfigError`` (bad value, checkpoint of another config), ``CheckpointError``
    (damaged checkpoints, none intact) or ``StoreError`` ends the process with its one-line
    message (``error: …``) and its class's exit status (``cli.EXIT_CODES``), instead of
    Hydra's multi-line job report; in a local sweep this stops the sweep at the first
    refused job. Warnings (a damaged checkpoint skipped) print as one ``warning:`` line.
    """
    from hydra.core.hydra_config import HydraConfig

    from cli import exit_code, one_line, one_line_warnings
    from configs.schema import ConfigError
    from forensics.store import CheckpointError, StoreError

    TASK_STARTED.append(True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    with one_line_warnings():
        try:
            _task(cfg)
        except (ConfigError, CheckpointError, StoreError) as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            _drop_empty_log(output_dir)
            raise SystemExit(exit_code(err)) from None


# set once a task has started: a Hydra exit before it is a config composition error
TASK_STARTED: list[bool] = []


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from cli import enable_compilation_cache, training
    from configs.schema import validate

    config = validate(cfg)
    enable_compilation_cache()
    hydra_cfg = HydraConfig.get()
    hydra_record = {  # what Hydra would write to .hydra/ (see hydra.output_subdir)
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_cfg}),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }
    training.run(
        config,
        Path(hydra_cfg.runtime.output_dir),
        hydra_record=hydra_record,
        command=job_command(hydra_cfg),
    )


def train(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Hydra overrides (key=value, group=option) and Hydra flags."),
    ] = None,
    multirun: Annotated[
        bool,
        typer.Option(
            "--multirun", "-m", help="Sweep: one run per combination of comma-separated values."
        ),
    ] = False,
) -> None:
    from cli import EXIT_CONFIG

    TASK_STARTED.clear()
    try:
        run_hydra(task, "forensics train", overrides or [], multirun)
    except SystemExit as done:
        # Hydra reports a misspelt group/key (before any task) with status 1: a config error
        if done.code == 1 and not TASK_STARTED:
            raise SystemExit(EXIT_CONFIG) from None
        raise


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        help=HELP,
        context_settings={"ignore_unknown_options": True},
    )(train)
