"""``forensics fit-probe RUN_DIR``: fit the post-hoc probe critics forensics needs on HATRPO."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

HELP = """Fit post-hoc centralised probe Q critics to a trained run's frozen policy.

HATRPO learns only a state value, but Stage 2 (and the attacks' onset selection) probe the
gradient and curvature of an action-value critic Q_j(o, a) in each agent's action. As in
the paper, this rolls out the newest checkpoint's stochastic policy (each action replaced by
a random one with probability probe.epsilon), regresses every agent's discounted
return-to-go on the joint observation and action, reports the held-out R² per agent, and
saves the critics atomically in RUN_DIR/probe_critic/ (tied to that checkpoint: a newer
checkpoint needs a new fit). `forensics rollout` and `forensics diagnose` then use them.

Overrides set agents/probe_critic.py:ProbeConfig fields, e.g. `probe.episodes=4096
probe.epochs=100 probe.gamma=0.95`.

Example: `forensics fit-probe runs/simple_spread_3-hatrpo-seed0`
"""


def fit_probe(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `forensics train`.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="probe.<field>=<value> settings.")
    ] = None,
) -> None:
    from cli import enable_compilation_cache, one_line_errors

    enable_compilation_cache()
    with one_line_errors():
        import yaml

        from agents import probe_critic
        from configs.schema import ConfigError

        fields = {}
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("probe."):
                raise ConfigError(f"{item}: expected probe.<field>=<value>")
            fields[key.removeprefix("probe.")] = yaml.safe_load(value)  # 4096, 1e-3, [64,64]
        try:
            cfg = probe_critic.ProbeConfig.from_mapping(fields)
        except ValueError as err:  # unknown field or bad value: one line, nothing fitted
            raise ConfigError(str(err)) from None
        meta = probe_critic.fit_and_save(run_dir, cfg)
    report = meta["report"]
    r2 = ", ".join(f"{x:.3f}" for x in report["holdout_r2"])
    typer.echo(
        f"Probe critics for {run_dir} (policy at env step {meta['policy_env_steps']:,}): "
        f"held-out R² per agent {r2} over {report['holdout_episodes']} episodes"
    )
    typer.echo(json.dumps(meta["probe_config"]))


def register(app: typer.Typer) -> None:
    app.command("fit-probe", help=HELP)(fit_probe)
