"""``forensics evaluate-policy RUN_DIR | --sweep SWEEP_DIR``: greedy episodes of newest checkpoints.

Reports the mean per-agent return R̄ = (1/EN) Σ_e Σ_i R_i^e with a 95 % confidence
half-width over episodes, and the share of the random → scripted gap closed,
(R̄ − R_random) / (R_scripted − R_random), against the reference returns in
``envs.simple_spread``. The result is also written to ``RUN_DIR/evaluation.json``.

A sweep directory (``runs/sweeps/<sweep_name>``, one run directory per job) gives one table:
a row per run, and per (env, algo) the mean over its runs (seeds) of R̄ with a Student-t 95 %
half-width over runs; the rows are written to ``SWEEP_DIR/evaluation.parquet``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

EVALUATION_FILE = "evaluation.json"
SWEEP_TABLE = "evaluation.parquet"


def evaluate(run_dir: Path, episodes: int = 500, seed: int = 0) -> dict[str, Any]:
    """Evaluate the newest checkpoint in ``run_dir``; returns (and writes) the summary."""
    import jax

    from agents import checkpoint
    from agents.evaluate import mean_ci, run_episodes
    from envs.simple_spread import gap_closed
    from forensics.store import atomic_write

    policy = checkpoint.load_policy(run_dir)
    spec = policy.env.spec
    stats = run_episodes(
        policy.env, checkpoint.greedy_act_fn(policy), jax.random.PRNGKey(seed), episodes
    )
    returns = stats.returns
    mean, half_width = mean_ci(returns)
    win_rate = win_half_width = None
    if stats.won is not None:
        win_rate, win_half_width = mean_ci(stats.won.astype(float))
    gap = None  # reference returns exist for Simple Spread only
    if spec.name == "simple_spread":
        try:
            gap = float(gap_closed(mean, spec.num_agents, not spec.discrete))
        except ValueError:  # no reference returns for this N
            pass
    result = {
        "run_dir": str(run_dir),
        "env_steps": policy.env_steps,
        "env": policy.config["env"],
        "algo": policy.config["algo"]["name"],
        "seed": policy.config["seed"],
        "episodes": episodes,
        "eval_seed": seed,
        "mean_return_per_agent": mean,
        "ci95_half_width": half_width,
        "per_agent_mean_return": [float(r) for r in returns.mean(axis=0)],
        "gap_closed": gap,
        "win_rate": win_rate,
        "win_rate_ci95_half_width": win_half_width,
    }
    atomic_write(Path(run_dir) / EVALUATION_FILE, json.dumps(result, indent=2) + "\n")
    return result


def summary_line(result: dict[str, Any]) -> str:
    gap = result["gap_closed"]
    closed = "" if gap is None else f"; closes {100 * gap:.1f} % of the random→scripted gap"
    if result.get("win_rate") is not None:
        win, half = 100 * result["win_rate"], 100 * result["win_rate_ci95_half_width"]
        closed += f"; wins {win:.1f} ± {half:.1f} %"
    return (
        f"Evaluation ({result['episodes']} episodes, env step {result['env_steps']:,}): "
        f"mean per-agent return {result['mean_return_per_agent']:.2f} "
        f"± {result['ci95_half_width']:.2f} (95 % CI){closed}"
    )


def sweep_runs(sweep_dir: Path) -> list[Path]:
    """The run directories of a sweep: its subdirectories that hold checkpoints."""
    from agents.checkpoint import CHECKPOINT_DIR

    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    runs = sorted(p for p in sweep_dir.iterdir() if (p / CHECKPOINT_DIR).is_dir())
    if not runs:
        raise FileNotFoundError(
            f"{sweep_dir}: no run directories (with {CHECKPOINT_DIR}/) in it; expected a "
            "sweep directory such as runs/sweeps/<sweep_name>"
        )
    return runs


def evaluation_of(run_dir: Path, episodes: int, seed: int) -> dict[str, Any]:
    """The run's ``evaluation.json`` when it is of its newest checkpoint with these
    ``episodes`` and ``seed`` (e.g. written by the training job itself), else a fresh one."""
    from agents import checkpoint

    try:
        saved = json.loads((run_dir / EVALUATION_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        saved = {}
    wanted = {
        "env_steps": checkpoint.manager(run_dir).latest_step(),
        "episodes": episodes,
        "eval_seed": seed,
    }
    if "seed" in saved and all(saved.get(k) == v for k, v in wanted.items()):
        return saved
    return evaluate(run_dir, episodes, seed)


def sweep_table(sweep_dir: Path, episodes: int = 500, seed: int = 0):
    """(per-run rows, per (env, algo) summary over runs) of every run of a sweep; both
    ``pandas.DataFrame``. Summary: the mean of the runs' R̄ with its Student-t 95 %
    half-width over runs (NaN with a single run), and the mean gap closed."""
    import numpy as np
    import pandas as pd

    from agents.evaluate import mean_ci
    from configs import env_label

    rows = []
    for run in sweep_runs(sweep_dir):
        r = evaluation_of(run, episodes, seed)
        env = r["env"]
        rows.append(
            {
                "run": run.name,
                "env": env_label(env),
                "algo": r["algo"],
                "seed": r["seed"],
                "env_steps": r["env_steps"],
                "mean_return": r["mean_return_per_agent"],
                "ci95": r["ci95_half_width"],
                "gap_closed": np.nan if r["gap_closed"] is None else r["gap_closed"],
            }
        )
    runs = pd.DataFrame(rows)
    groups = []
    for (env, algo), g in runs.groupby(["env", "algo"], sort=True):
        returns = g["mean_return"].to_numpy()
        mean, half = mean_ci(returns, student=True) if len(g) > 1 else (returns[0], np.nan)
        groups.append(
            {
                "env": env,
                "algo": algo,
                "runs": len(g),
                "mean_return": mean,
                "ci95": half,
                "gap_closed": g["gap_closed"].mean(),
            }
        )
    return runs, pd.DataFrame(groups)


RUN_COLUMNS = {
    "env": "env",
    "algo": "algo",
    "seed": "seed",
    "env_steps": "env steps",
    "mean_return": "return",
    "ci95": "± 95 %",
    "gap_closed": "gap closed",
    "run": "run directory",
}
GROUP_COLUMNS = {
    "env": "env",
    "algo": "algo",
    "runs": "runs",
    "mean_return": "return",
    "ci95": "± 95 %",
    "gap_closed": "gap closed",
}


def _cell(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value != value:  # NaN: not defined (no reference returns, a single run)
        return "—"
    if key == "gap_closed":
        return f"{value:.1%}"
    if key in ("mean_return", "ci95"):
        return f"{value:.2f}"
    return f"{int(value):,}" if key == "env_steps" else str(int(value))


def _rich_table(df: Any, columns: dict[str, str], title: str) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD)
    for key, header in columns.items():
        text = key in ("env", "algo", "run")
        # the run directory (Hydra's override_dirname) is long: it folds, nothing else wraps
        table.add_column(
            header,
            justify="left" if text else "right",
            no_wrap=key != "run",
            overflow="fold",
            min_width=24 if key == "run" else None,
        )
    for row in df.to_dict("records"):
        table.add_row(*(_cell(key, row[key]) for key in columns))
    return table


def _print_sweep(sweep_dir: Path, runs: Any, summary: Any, episodes: int) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    title = f"{sweep_dir}: {len(runs)} runs, {episodes} greedy episodes each"
    console.print(_rich_table(runs, RUN_COLUMNS, title))
    console.print(_rich_table(summary, GROUP_COLUMNS, "Per env and algo, over its runs (seeds)"))
    console.print(
        "return: mean per-agent return of the greedy policy, ± the 95 % CI over episodes "
        "(per run) or over runs (Student-t, per env and algo); gap closed: share of the "
        "random → scripted gap"
    )


def evaluate_policy(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A run directory written by `forensics train`.")
    ] = None,
    sweep: Annotated[
        Path | None,
        typer.Option(
            "--sweep",
            help="A sweep directory (runs/sweeps/<sweep_name>): every run in it, one table.",
        ),
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", "-e", min=2, help="Episodes.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the evaluation episodes, in [0, 2**31).")] = 0,
) -> None:
    """Evaluate a trained run, or every run of a sweep: mean per-agent return ± 95 % CI.

    Loads only the policy parameters of the newest checkpoint (not the replay buffer),
    runs all episodes in one jitted, vmapped call, prints the mean per-agent return with
    its confidence interval and the share of the random → scripted gap closed, and writes
    `RUN_DIR/evaluation.json`.

    With `--sweep`, every run directory of the sweep is evaluated (a run's own
    `evaluation.json` is reused when it is of its newest checkpoint with the same episodes
    and seed, e.g. the one the training job wrote) and one table is printed: a row per run
    and, per env and algo, the mean over runs (seeds) with a Student-t 95 % CI over runs.
    The per-run rows are written to `SWEEP_DIR/evaluation.parquet`.

    Examples:

    * `forensics evaluate-policy runs/simple_spread_3-maddpg-seed0 --episodes 500`
    * `forensics evaluate-policy --sweep runs/sweeps/grid --episodes 500`
    """
    from cli import EXIT_USAGE, enable_compilation_cache, one_line_errors
    from configs.schema import check_seed

    if (run_dir is None) == (sweep is None):
        typer.echo("error: give either RUN_DIR or --sweep SWEEP_DIR (one of them)", err=True)
        raise typer.Exit(EXIT_USAGE)
    with one_line_errors(ValueError):
        check_seed(seed, "--seed")
        enable_compilation_cache()
        if sweep is not None:
            runs, summary = sweep_table(sweep, episodes, seed)
        else:
            result = evaluate(run_dir, episodes, seed)
    if sweep is None:
        typer.echo(summary_line(result))
        typer.echo(f"Wrote {run_dir / EVALUATION_FILE}")
        return
    from forensics.store import write_table

    _print_sweep(sweep, runs, summary, episodes)
    meta = {"sweep": str(sweep), "episodes": episodes, "eval_seed": seed}
    typer.echo(f"Wrote {write_table(runs, sweep / SWEEP_TABLE, metadata=meta)}")


def register(app: typer.Typer) -> None:
    app.command("evaluate-policy")(evaluate_policy)
