"""``forensics train [OVERRIDES...] [-m]``: compose the Hydra config, validate, train."""

from __future__ import annotations

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


def task(cfg: DictConfig) -> None:
    """Hydra task: validate first, then train in Hydra's output directory.

    A ``ConfigError`` (bad value, checkpoint of another config) ends the process with its
    one-line message and exit status 1, instead of Hydra's multi-line job report; in a
    local sweep this stops the sweep at the first refused job.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from cli import enable_compilation_cache, training
    from configs.schema import ConfigError, validate

    try:
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
    except ConfigError as err:
        print(err, file=sys.stderr)
        raise SystemExit(1) from None


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
    run_hydra(task, "forensics train", overrides or [], multirun)


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        help=HELP,
        context_settings={"ignore_unknown_options": True},
    )(train)
