"""``forensics evaluate-policy RUN_DIR``: greedy episodes of a run's newest checkpoint.

Reports the mean per-agent return R̄ = (1/EN) Σ_e Σ_i R_i^e with a 95 % confidence
half-width over episodes, and the share of the random → scripted gap closed,
(R̄ − R_random) / (R_scripted − R_random), against the reference returns in
``envs.simple_spread``. The result is also written to ``RUN_DIR/evaluation.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

EVALUATION_FILE = "evaluation.json"


def evaluate(run_dir: Path, episodes: int = 500, seed: int = 0) -> dict[str, Any]:
    """Evaluate the newest checkpoint in ``run_dir``; returns (and writes) the summary."""
    import jax

    from agents import checkpoint
    from agents.evaluate import mean_ci, run_episodes
    from envs.simple_spread import gap_closed

    policy = checkpoint.load_policy(run_dir)
    spec = policy.env.spec
    returns = run_episodes(
        policy.env, checkpoint.greedy_act_fn(policy), jax.random.PRNGKey(seed), episodes
    )
    mean, half_width = mean_ci(returns)
    try:
        gap = float(gap_closed(mean, spec.num_agents, not spec.discrete))
    except ValueError:  # no reference returns for this env/N
        gap = None
    result = {
        "run_dir": str(run_dir),
        "env_steps": policy.env_steps,
        "env": policy.config["env"],
        "algo": policy.config["algo"]["name"],
        "episodes": episodes,
        "eval_seed": seed,
        "mean_return_per_agent": mean,
        "ci95_half_width": half_width,
        "per_agent_mean_return": [float(r) for r in returns.mean(axis=0)],
        "gap_closed": gap,
    }
    (Path(run_dir) / EVALUATION_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_line(result: dict[str, Any]) -> str:
    gap = result["gap_closed"]
    closed = "" if gap is None else f"; closes {100 * gap:.1f} % of the random→scripted gap"
    return (
        f"Evaluation ({result['episodes']} episodes, env step {result['env_steps']:,}): "
        f"mean per-agent return {result['mean_return_per_agent']:.2f} "
        f"± {result['ci95_half_width']:.2f} (95 % CI){closed}"
    )


def evaluate_policy(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `forensics train`.")],
    episodes: Annotated[int, typer.Option("--episodes", "-e", min=2, help="Episodes.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the evaluation episodes.")] = 0,
) -> None:
    """Evaluate a trained run: mean per-agent return ± 95 % CI over greedy episodes.

    Loads only the policy parameters of the newest checkpoint (not the replay buffer),
    runs all episodes in one jitted, vmapped call, prints the mean per-agent return with
    its confidence interval and the share of the random → scripted gap closed, and writes
    `RUN_DIR/evaluation.json`.

    Example: `forensics evaluate-policy runs/simple_spread_3-maddpg-seed0 --episodes 500`
    """
    from cli import enable_compilation_cache

    enable_compilation_cache()
    try:
        result = evaluate(run_dir, episodes, seed)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_line(result))
    typer.echo(f"Wrote {run_dir / EVALUATION_FILE}")


def register(app: typer.Typer) -> None:
    app.command("evaluate-policy")(evaluate_policy)
