"""``forensics``: the command-line entry point (console script ``cli.main:app``).

Each subcommand lives in its own thin module under ``cli/`` exposing
``register(app)``; adding one is adding its module name to ``SUBCOMMANDS``. Heavy imports
(JAX, Orbax) happen inside the commands, so ``forensics --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

from cli import EXIT_CODES

SUBCOMMANDS = (
    "train",
    "evaluate_policy",
    "fit_probe",
    "fit_models",
    "rollout",
    "diagnose",
    "evaluate",
    "report",
    "play_sc2",
)

HELP = """Failure forensics for cooperative multi-agent RL.

Train cooperative policies in JAX, inject faults or attacks into one agent, record
episodes, and find who failed first, why a downstream agent was flagged, and how the
failure spread. Configs are Hydra's (`configs/`); every stage reads what the previous one
wrote to disk.

Typical session:

* `forensics train` (Simple Spread N=3, MADDPG, seed 0)
* `forensics evaluate-policy runs/simple_spread_3-maddpg-seed0`
* `forensics rollout runs/simple_spread_3-maddpg-seed0 -o stores/ss3-worst` (attacked episodes)
* `forensics rollout runs/simple_spread_3-maddpg-seed0 -o stores/ss3-clean --seeds 1000:1100
  attack=none` (clean calibration episodes)
* `forensics diagnose stores/ss3-worst --calibration stores/ss3-clean`
* `forensics evaluate stores/ss3-worst/diagnosis`
* `forensics report stores/ss3-worst/diagnosis --episode 7`

Run `forensics COMMAND --help` for each command's options and examples.

Exit status (the same for every command; errors print one line, `error: …`):

""" + "\n".join(f"* {code}: {what}" for code, what in EXIT_CODES.items())

app = typer.Typer(
    name="forensics",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)

for _name in SUBCOMMANDS:
    importlib.import_module(f"cli.{_name}").register(app)
