"""``forensics sc2-evaluate RUN_DIR --map 3s_vs_3z``: a SMAX-trained policy in the real game.

Plays greedy episodes of the run's newest checkpoint in StarCraft II (``envs.sc2.Sc2Env``:
SMAX-layout observations and availability masks from the game's raw units, SMAX actions
turned into unit commands) against SC2's built-in AI, and reports the win rate
p̂ = wins / episodes with a normal-approximation 95 % half-width 1.96 · s / √E. The result
is written to ``RUN_DIR/sc2_evaluation.json``. Without the game, the SMAC map or
pysc2_evolved it prints the one-line install error and exits with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

SC2_EVALUATION_FILE = "sc2_evaluation.json"


def check_run_matches(env_config: dict[str, Any], map_name: str, run_dir: Path) -> None:
    """A SMAX run of the same map (same slots, observation and action sizes), or a
    ValueError naming what the run was trained on."""
    if env_config.get("name") != "smax" or env_config.get("map_name") != map_name:
        raise ValueError(
            f"{run_dir}: trained on env {env_config.get('name')} map "
            f"{env_config.get('map_name')}; sc2-evaluate --map {map_name} needs a SMAX run "
            f"of that map (env=smax_{map_name})"
        )


def evaluate_in_sc2(
    run_dir: Path,
    map_name: str,
    episodes: int,
    sc2path: str | None = None,
    seed: int = 0,
    difficulty: str = "VeryHard",
) -> dict[str, Any]:
    """Greedy episodes in the real game; returns (and writes) the summary."""
    import jax
    import numpy as np

    from agents import checkpoint
    from agents.evaluate import mean_ci
    from envs.sc2 import Sc2Env, check_install
    from forensics.store import atomic_write, current_code_version

    check_install(sc2path, map_name)
    policy = checkpoint.load_policy(run_dir)
    env_config = policy.config["env"]
    check_run_matches(env_config, map_name, run_dir)
    env = Sc2Env(
        env_config["num_agents"],
        map_name=map_name,
        max_steps=env_config.get("max_steps"),
        sc2path=sc2path,
        difficulty=difficulty,
        seed=seed,
    )
    act = jax.jit(checkpoint.greedy_act_fn(policy))
    won, returns, lengths = [], [], []
    try:
        for _ in range(episodes):
            obs, state = env.reset()
            done, total, steps = False, np.zeros(env.spec.num_agents), 0
            while not done:
                actions = act(obs, env.avail_actions(state))
                obs, state, reward, done, info = env.step(None, state, actions)
                total += np.asarray(reward)
                steps += 1
            won.append(bool(info["won"]))
            returns.append(total)
            lengths.append(steps)
    finally:
        env.close()
    win_rate, half_width = mean_ci(np.asarray(won, float))
    result = {
        "run_dir": str(run_dir),
        "env_steps": policy.env_steps,
        "map_name": map_name,
        "difficulty": difficulty,
        "game_seed": seed,
        "episodes": episodes,
        "win_rate": win_rate,
        "win_rate_ci95_half_width": half_width,
        "mean_return_per_agent": float(np.mean(returns)),
        "mean_length": float(np.mean(lengths)),
        "code_version": current_code_version(),
    }
    atomic_write(run_dir / SC2_EVALUATION_FILE, json.dumps(result, indent=2) + "\n")
    return result


def sc2_evaluate(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run directory of a SMAX policy (`forensics train env=smax_…`)."),
    ],
    map_name: Annotated[
        str, typer.Option("--map", help="SMAC map; the run must be SMAX's same map.")
    ] = "3s_vs_3z",
    episodes: Annotated[int, typer.Option("--episodes", "-e", min=2, help="Episodes.")] = 20,
    sc2path: Annotated[
        str | None,
        typer.Option(help="StarCraft II folder (default: $SC2PATH, else ~/StarCraftII)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="The game's random seed.")] = 0,
    difficulty: Annotated[
        str, typer.Option(help="Built-in AI difficulty (sc2api Difficulty name; SMAC: VeryHard).")
    ] = "VeryHard",
) -> None:
    """Evaluate a SMAX-trained run in the real StarCraft II game: win rate ± 95 % CI.

    Needs a local game (SC2PATH), the SMAC map in `$SC2PATH/Maps/SMAC_Maps/` and
    `pip install -e '.[sc2]'` (README, "StarCraft II (real game)"); each one missing is a
    one-line error. The policy acts greedily on SMAX-layout observations built from the
    game's units, with SMAX's availability masks; see `envs/sc2.py` for the translation
    and its caveats. Writes `RUN_DIR/sc2_evaluation.json`.

    Example:

    * `forensics sc2-evaluate runs/smax_3s_vs_3z-hatrpo-seed0 --map 3s_vs_3z --episodes 20`
    """
    from envs.sc2 import Sc2InstallError

    try:
        result = evaluate_in_sc2(run_dir, map_name, episodes, sc2path, seed, difficulty)
    except (Sc2InstallError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    win, half = 100 * result["win_rate"], 100 * result["win_rate_ci95_half_width"]
    typer.echo(
        f"StarCraft II {map_name} vs built-in AI ({difficulty}), {episodes} episodes, "
        f"env step {result['env_steps']:,}: wins {win:.1f} ± {half:.1f} % (95 % CI); "
        f"mean length {result['mean_length']:.1f} steps"
    )
    typer.echo(f"Wrote {run_dir / SC2_EVALUATION_FILE}")


def register(app: typer.Typer) -> None:
    app.command("sc2-evaluate")(sc2_evaluate)
