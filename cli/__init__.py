"""The ``forensics`` command line: one thin module per subcommand (see ``cli.main``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk across invocations.

    Resuming a run, evaluating it and later stages recompile the same jitted functions
    (tens of seconds each on a small CPU); JAX's persistent cache turns repeats into a
    file read. ``JAX_COMPILATION_CACHE_DIR`` chooses the place; the default is
    ``$XDG_CACHE_HOME/marl-forensics/jax`` (``~/.cache/...``).
    """
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        jax.config.update("jax_compilation_cache_dir", str(cache_home / "marl-forensics" / "jax"))


def progress_bar(console: Any, enabled: bool, unit: str) -> Any:
    """A rich progress bar counting ``unit`` (done/total, elapsed, eta); ``enabled=False``
    keeps the console free for logs (``--no-progress``, ``train.progress=false``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def invocation(ctx: Any) -> str:
    """The running subcommand (its ``typer.Context``) as a command line that re-runs it,
    rebuilt from the parsed parameters (``sys.argv`` belongs to whatever process hosts the
    app, e.g. a test runner)."""
    import shlex

    words = ["forensics", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        is_option = param.param_type_name == "option"
        if value is None or (is_option and value == param.default):
            continue
        values = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
        if not is_option:
            words += values
        elif isinstance(value, bool):
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            words += [param.opts[0], *values]
    return shlex.join(words)


def one_line(err: BaseException) -> str:
    """An exception's message on one line (Hydra's multi-line messages folded)."""
    text = str(err).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2 and lines[1].startswith("Available options"):
        return f"{lines[0]}; {lines[1]} {', '.join(lines[2:])}"
    return " ".join(lines) or type(err).__name__


# The exit status of every `forensics` command, one per class of error (the one home of
# this table: `forensics --help` and the README show it). Scripts and CI can tell "fix
# your config" from "your data is damaged" from "a bug" without parsing messages.
EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_CONFIG, EXIT_DATA, EXIT_CHECKPOINT = 0, 1, 2, 3, 4, 5
EXIT_MISSING_GAME, EXIT_INTERRUPTED = 6, 130
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_BUG: "internal error: a bug, printed with its traceback",
    EXIT_USAGE: "bad command line (unknown option, missing argument)",
    EXIT_CONFIG: "bad value (config, override, option, seed), or one the checkpoint disagrees with",
    EXIT_DATA: "episode store or diagnosis invalid, damaged or incomplete (partial data)",
    EXIT_CHECKPOINT: "checkpoint missing or damaged (content hash, unreadable) with no intact "
    "older one",
    EXIT_MISSING_GAME: "StarCraft II, its maps or pysc2 not installed (sc2-evaluate, sc2-rollout)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); what was committed is kept",
}


def exit_code(err: BaseException) -> int:
    """The exit status of a one-line error (see ``EXIT_CODES``)."""
    from forensics.store import CheckpointError, StoreError

    if isinstance(err, CheckpointError):
        return EXIT_CHECKPOINT
    if isinstance(err, StoreError | FileNotFoundError):
        return EXIT_DATA
    return EXIT_CONFIG  # ConfigError, Hydra's errors, other bad values


@contextlib.contextmanager
def one_line_errors(*also: type[Exception]) -> Iterator[None]:
    """Bad input — a config value or override (``ConfigError``, Hydra's errors), a store
    (``StoreError``), a checkpoint (``CheckpointError``), a missing file, or one of the
    exception types ``also`` names — ends the command with ``error: <one line>`` on stderr
    and its class's exit status (``exit_code``). Warnings print as ``warning: <one line>``.
    Anything else is a bug and keeps its traceback."""
    import typer
    from hydra.errors import HydraException

    from forensics.store import CheckpointError, StoreError

    with one_line_warnings():
        try:
            yield
        except (HydraException, StoreError, CheckpointError, FileNotFoundError, *also) as err:
            typer.echo(f"error: {one_line(err)}", err=True)
            raise typer.Exit(exit_code(err)) from None


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings shown as ``warning: <message>`` (no file:line, no source line). Only the
    format changes: whoever records warnings (``pytest.warns``, a caller's
    ``catch_warnings``) still receives them."""
    import warnings

    saved = warnings.formatwarning
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = saved


@contextlib.contextmanager
def recording_errors(out: Any) -> Iterator[None]:
    """What a command that appends episodes to the store ``out`` does on bad input (a
    config, an override, a value, a store, a checkpoint or a missing file: ``error: <one
    line>``, its ``exit_code``) and on Ctrl-C (what was committed stays: re-running the
    same command resumes; exit 130)."""
    import typer

    try:
        with one_line_errors(ValueError):
            yield
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: the episodes committed to {out} are kept; re-run the same command "
            "to resume",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
