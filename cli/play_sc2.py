"""``forensics sc2-evaluate`` and ``forensics sc2-rollout``: a SMAX-trained policy in the real game.

``sc2-rollout`` records clean or attacked game episodes into an episode store
(``cli.recording.record`` with a ``stepped_env``; see its ``--help``). ``sc2-evaluate``:

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

# The arguments both game commands take.
RunDirArg = Annotated[
    Path, typer.Argument(help="A run directory of a SMAX policy (`forensics train env=smax_…`).")
]
MapOption = Annotated[str, typer.Option("--map", help="SMAC map; the run must be SMAX's same map.")]
Sc2PathOption = Annotated[
    str | None, typer.Option(help="StarCraft II folder (default: $SC2PATH, else ~/StarCraftII).")
]
DifficultyOption = Annotated[
    str, typer.Option(help="Built-in AI difficulty (sc2api Difficulty name; SMAC: VeryHard).")
]


def check_run_matches(env_config: dict[str, Any], map_name: str, run_dir: Path) -> None:
    """A SMAX run of the same map (same slots, observation and action sizes), or a
    ValueError naming what the run was trained on."""
    if env_config.get("name") != "smax" or env_config.get("map_name") != map_name:
        raise ValueError(
            f"{run_dir}: trained on env {env_config.get('name')} map "
            f"{env_config.get('map_name')}; --map {map_name} needs a SMAX run "
            f"of that map (env=smax_{map_name})"
        )


def game_of(policy: Any, map_name: str, sc2path: str | None, difficulty: str, seed: int) -> Any:
    """The real game (``envs.sc2.Sc2Env``) for a SMAX run of ``map_name``: its agents and
    step limit, SC2's built-in AI at ``difficulty``, launched with ``seed``."""
    from envs.sc2 import Sc2Env

    env_config = policy.config["env"]
    check_run_matches(env_config, map_name, policy.run_dir)
    return Sc2Env(
        env_config["num_agents"],
        map_name=map_name,
        max_steps=env_config.get("max_steps"),
        sc2path=sc2path,
        difficulty=difficulty,
        seed=seed,
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
    from envs.sc2 import check_install
    from forensics.store import atomic_write, current_code_version

    check_install(sc2path, map_name)
    policy = checkpoint.load_policy(run_dir)
    env = game_of(policy, map_name, sc2path, difficulty, seed)
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
    run_dir: RunDirArg,
    map_name: MapOption = "3s_vs_3z",
    episodes: Annotated[int, typer.Option("--episodes", "-e", min=2, help="Episodes.")] = 20,
    sc2path: Sc2PathOption = None,
    seed: Annotated[int, typer.Option(help="The game's random seed.")] = 0,
    difficulty: DifficultyOption = "VeryHard",
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
    from cli import EXIT_MISSING_GAME, one_line_errors
    from configs.schema import check_seed
    from envs.sc2 import Sc2InstallError

    try:
        with one_line_errors(ValueError):
            check_seed(seed, "--seed")
            result = evaluate_in_sc2(run_dir, map_name, episodes, sc2path, seed, difficulty)
    except Sc2InstallError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_MISSING_GAME) from None
    win, half = 100 * result["win_rate"], 100 * result["win_rate_ci95_half_width"]
    typer.echo(
        f"StarCraft II {map_name} vs built-in AI ({difficulty}), {episodes} episodes, "
        f"env step {result['env_steps']:,}: wins {win:.1f} ± {half:.1f} % (95 % CI); "
        f"mean length {result['mean_length']:.1f} steps"
    )
    typer.echo(f"Wrote {run_dir / SC2_EVALUATION_FILE}")


ROLLOUT_HELP = """Record clean or attacked episodes of a SMAX-trained run in the real StarCraft II
game into an episode store that `forensics diagnose` and `forensics evaluate` read as they
read a `forensics rollout` store.

Loads the newest checkpoint of RUN_DIR (a SMAX run of the same map), launches the game
once (`--game-seed`, against SC2's built-in AI at `--difficulty`) and, per seed s, plays
the clean greedy episode, then the attack's protocol: each ordered pair (victim i,
observed j) selected by `attack.victim` — the default `all` cycles the victim over every
agent — with its onset drawn uniformly from [0, L − window], L the clean episode's played
length (`attack.start=uniform`; the high/low-influence onsets of `forensics rollout` need
the critic geometry of a replayed clean episode, which the game cannot give). Each seed is
committed to the store as soon as it is played; re-running the command resumes.

With `--clean` it records only the clean episodes: the calibration store of `diagnose`
(use seeds disjoint from the attacked store's). Episodes that end before T are padded as
SMAX's are (last observation and masks, zero reward, `valid` false), and the legal actions
are recorded (`avail`).

Not replayable: the game's randomness is not a function of the recorded key, so a game
episode cannot be re-simulated, and a seed's attacked episodes are not the counterfactuals
of its clean one; each is stored under its own `replay_key`, so `forensics evaluate`
leaves the counterfactual columns (Q-drop, reward drop, divergence) empty rather than
pairing unrelated episodes. The store's sessions say `rollout.played_in: sc2`; appending
SMAX (`forensics rollout`) episodes to it, or game episodes to a SMAX store, is refused.

Arguments after RUN_DIR are attack overrides as for `forensics rollout` (default
`attack=worst_action`). Needs a local game (SC2PATH), the SMAC map in
`$SC2PATH/Maps/SMAC_Maps/` and `pip install -e '.[sc2]'`; each one missing is a one-line
error with exit status 2.

Examples:

* `forensics sc2-rollout runs/smax_3s_vs_3z-maddpg-seed0 --map 3s_vs_3z -o stores/sc2-worst
  --seeds 0:20 attack=worst_action`
* `forensics sc2-rollout runs/smax_3s_vs_3z-maddpg-seed0 --map 3s_vs_3z -o stores/sc2-clean
  --seeds 1000:1100 --clean`
* `forensics diagnose stores/sc2-worst -c stores/sc2-clean`
"""


def sc2_rollout(
    ctx: typer.Context,
    run_dir: RunDirArg,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides of the attack (key=value).")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Episode store directory (created or resumed).")
    ] = ...,
    map_name: MapOption = "3s_vs_3z",
    seeds: Annotated[
        str,
        typer.Option(
            help="Seeds: START:STOP (half-open), N, or a comma list; per seed one clean "
            "episode plus the attacked ones."
        ),
    ] = "0:20",
    clean: Annotated[
        bool, typer.Option("--clean", help="Clean episodes only (attack=none): calibration.")
    ] = False,
    sc2path: Sc2PathOption = None,
    game_seed: Annotated[int, typer.Option(help="The game's random seed (set at launch).")] = 0,
    difficulty: DifficultyOption = "VeryHard",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    from rich.console import Console

    from agents import checkpoint
    from agents.attacks import Attack
    from cli import enable_compilation_cache, invocation, progress_bar, recording, recording_errors
    from configs.schema import check_seed
    from envs.sc2 import Sc2InstallError, check_install

    console = Console(soft_wrap=True)
    enable_compilation_cache()
    env = None
    try:
        with recording_errors(out):
            check_seed(game_seed, "--game-seed")
            check_install(sc2path, map_name)
            seed_list = recording.parse_seeds(seeds)
            overrides = list(overrides or [])
            if clean and overrides:
                raise ValueError(f"--clean records clean episodes; drop the overrides {overrides}")
            policy = checkpoint.load_policy(run_dir)
            config = recording.rollout_config(["attack=none"] if clean else overrides,
                                              policy.config, run_dir)  # fmt: skip
            config["attack"] = recording.stepped_attack_config(config["attack"], overrides)
            attack = Attack.from_config(config["attack"])
            per_seed = recording.episodes_per_seed(attack, policy.env.spec.num_agents)
            env = game_of(policy, map_name, sc2path, difficulty, game_seed)
            session = {
                "command": invocation(ctx),
                "run_dir": str(run_dir.resolve()),
                "checkpoint_env_steps": policy.env_steps,
                "seeds": seeds,
                "map_name": map_name,
                "difficulty": difficulty,
                "game_seed": game_seed,
            }
            with progress_bar(console, progress, "episodes") as bar:
                task = bar.add_task("sc2-rollout", total=len(seed_list) * per_seed)
                done = recording.record(
                    out, policy, config, seed_list, chunk_seeds=1,
                    on_chunk=lambda n: bar.advance(task, n), session=session, stepped_env=env,
                )  # fmt: skip
    except Sc2InstallError as err:
        from cli import EXIT_MISSING_GAME

        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_MISSING_GAME) from None
    finally:
        if env is not None:
            env.close()
    report_stepped(console, out, done, per_seed)


def report_stepped(console: Any, out: Path, done: Any, per_seed: int) -> None:
    """One line of what was recorded (``recording.Recorded``), and the attacks that never ran."""
    if not done.seeds_recorded:
        console.print(f"Nothing to record: all {done.seeds_skipped} seeds are in {out} already")
        return
    console.print(
        f"Recorded {done.episodes:,} episodes ({done.seeds_recorded} seeds × {per_seed}) in "
        f"{done.compute_s + done.write_s:.1f} s into {out}"
        + (f" (resumed: {done.seeds_skipped} seeds were there)" if done.seeds_skipped else "")
    )
    if done.late_onsets:
        console.print(
            f"{done.late_onsets} attacked episodes ended before their onset (drawn from "
            "the seed's clean episode): the attack never ran in them"
        )


def register(app: typer.Typer) -> None:
    app.command("sc2-evaluate")(sc2_evaluate)
    app.command(
        "sc2-rollout", help=ROLLOUT_HELP, context_settings={"ignore_unknown_options": True}
    )(sc2_rollout)
