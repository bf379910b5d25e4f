"""Run a Hydra task function from a typer subcommand, with full Hydra semantics.

Typer parses only the subcommand's own options; everything else (``key=value``
overrides, ``-m/--multirun``, ``--cfg job``, ``hydra/launcher=...``) is handed to a
``hydra.main`` entry over the packaged config tree ``pkg://configs``, exactly as if that
entry were the program. Multirun sweeps, launchers, the run directory and Hydra's own
error messages (misspelt groups or keys) therefore behave as Hydra documents them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import hydra
from omegaconf import DictConfig

import configs


def run_hydra(
    task: Callable[[DictConfig], Any], prog: str, args: Sequence[str], multirun: bool
) -> None:
    """Call ``task`` once (or once per sweep point with ``multirun``) on the composed config."""
    entry = hydra.main(
        config_path=f"pkg://{configs.CONFIG_MODULE}",
        config_name=configs.CONFIG_NAME,
        version_base="1.3",
    )(task)
    saved = sys.argv
    sys.argv = [prog, *(["--multirun"] if multirun else []), *args]
    try:
        entry()
    finally:
        sys.argv = saved


def compose_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The validated, resolved run config for ``overrides``, without starting a Hydra job
    (no run directory, no logging set-up): for tests, notebooks and other stages."""
    from hydra import compose, initialize_config_module

    from configs.schema import validate

    with initialize_config_module(configs.CONFIG_MODULE, version_base="1.3"):
        cfg = compose(configs.CONFIG_NAME, overrides=list(overrides))
    return validate(cfg)
