"""``forensics rollout RUN_DIR --out STORE [--seeds A:B] [OVERRIDES...]``: record episodes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

HELP = """Record clean and attacked episodes of a trained run into an episode store.

Loads the newest checkpoint of RUN_DIR (actor and critic parameters; the env is the one
it was trained on) and, for every seed, records the clean greedy episode and the attack's
paired protocol: each ordered pair (victim i, observed j) × each onset class in
`attack.start` — for the paper's `attack=worst_action`, N(N−1)·2 attacked episodes per
seed plus the clean one. Seeds run in jitted, vectorised chunks (`--chunk-seeds`), each
committed to the store atomically with its ground truth (victim, observed agent, onset,
window, attack, magnitude, influence class); the store also records the resolved config,
the checkpoint's hash, the seeds and the code version.

Arguments after RUN_DIR are Hydra overrides of the attack (default `attack=worst_action`):
`attack=obs_fgsm`, `attack.epsilon=0.05`, `attack.start=high_influence`, `attack.victim=0`;
`attack=none` records clean episodes only. `env`, `algo` and `seed` come from the
checkpoint; overriding them to another value is refused.

Re-running the same command resumes an interrupted recording: seeds already in the store
are skipped, nothing is recorded twice. A store holds one checkpoint, env and attack;
any other is refused without writing. At the end the attack-efficacy table (team return
clean vs attacked per onset class, with the high- vs low-influence contrast) is printed
and written to `STORE/efficacy.parquet`.

Examples:

* `forensics rollout runs/simple_spread_3-maddpg-seed0 --out stores/ss3-worst attack=worst_action`
* `forensics rollout runs/simple_spread_5-maddpg-seed0 -o stores/ss5-fgsm attack=obs_fgsm
  attack.epsilon=0.05 --seeds 0:100`
"""


def rollout(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `forensics train`.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides of the attack (key=value).")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Episode store directory (created or resumed).")
    ] = ...,
    seeds: Annotated[
        str, typer.Option(help="Seeds: START:STOP (half-open), N, or a comma list of them.")
    ] = "0:500",
    chunk_seeds: Annotated[
        int, typer.Option(min=1, help="Seeds per jitted chunk (one store commit each).")
    ] = 32,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    from rich.console import Console

    from agents import checkpoint
    from agents.attacks import Attack
    from cli import enable_compilation_cache, invocation, progress_bar, recording, recording_errors
    from configs.schema import check_attack_fits
    from forensics.store import open_store

    console = Console(soft_wrap=True)
    enable_compilation_cache()
    with recording_errors(out):
        seed_list = recording.parse_seeds(seeds)
        policy = checkpoint.load_policy(run_dir)
        config = recording.rollout_config(overrides or [], policy.config, run_dir)
        attack = Attack.from_config(config["attack"])
        check_attack_fits(attack, policy.env.spec)  # before the progress bar starts
        per_seed = recording.episodes_per_seed(attack, policy.env.spec.num_agents)
        session = {
            "command": invocation(ctx),
            "run_dir": str(run_dir.resolve()),
            "checkpoint_env_steps": policy.env_steps,
            "seeds": seeds,
            "chunk_seeds": chunk_seeds,
        }
        with progress_bar(console, progress, "episodes") as bar:
            task = bar.add_task("rollout", total=len(seed_list) * per_seed)
            start = time.perf_counter()
            done = recording.record(
                out,
                policy,
                config,
                seed_list,
                chunk_seeds,
                on_chunk=lambda n: bar.advance(task, n),
                session=session,
            )
            wall = time.perf_counter() - start
        store = open_store(out)
        table = recording.efficacy(store, attack)
        written = recording.save_efficacy(store, table) if len(table) else None
    _report(console, out, attack, done, per_seed, wall, store, table, written)


def _report(console, out, attack, done, per_seed, wall, store, table, written) -> None:
    from rich import box
    from rich.table import Table

    if not done.seeds_recorded:
        console.print(
            f"Nothing to record: all {done.seeds_skipped} seeds are in {out} already "
            f"({store.n_episodes:,} episodes)"
        )
    else:
        if done.seeds_skipped:
            console.print(f"Resumed {out}: {done.seeds_skipped} of the seeds were recorded")
        console.print(
            f"Recorded {done.episodes:,} episodes ({done.seeds_recorded} seeds × {per_seed}) "
            f"in {wall:.1f} s, {done.episodes / wall:,.0f} episodes/s (rollouts "
            f"{done.compute_s:.1f} s incl. compilation, store writes {done.write_s:.1f} s); "
            f"{out} holds {store.n_episodes:,}"
        )
    if done.fell_back:
        console.print(
            f"{done.fell_back} influence onsets had no step with the required curvature "
            "sign in the search window and were chosen by G alone (attacks.select_start)"
        )
    if not len(table):
        console.print("Clean episodes only (attack=none): no efficacy table")
        return
    # attack and magnitude are one per store: in the title, so that the table fits 80 columns
    view = Table(
        title=f"Attack efficacy, {attack.name} (magnitude {attack.magnitude:g}): "
        "team return clean vs attacked",
        box=box.SIMPLE_HEAD,
    )
    columns = {
        "start": "onset",
        "episodes": "episodes",
        "clean_return": "clean",
        "attacked_return": "attacked",
        "drop": "drop",
        "drop_se": "± se",
        "share_hurt": "hurt",
        "action_changed": "changed",
        "high_beats_low": "high>low",
    }
    for header in columns.values():
        view.add_column(header, justify="left" if header == "onset" else "right")
    for _, row in table.iterrows():
        view.add_row(*(_cell(key, row[key]) for key in columns))
    console.print(view)
    console.print(
        "drop = clean − attacked team return of the same seed; hurt = share of episodes "
        "with drop > 0; changed = share of episodes in which the victim's executed action "
        "differed from its policy's greedy choice inside the window; high>low = share of "
        "(seed, pair) where the high-influence onset dropped the return more than the "
        "low-influence one"
    )
    console.print(f"Wrote {written}")


def _cell(key: str, value) -> str:
    if key == "start":
        return value.removesuffix("_influence")
    if isinstance(value, str):
        return value
    if value != value:  # NaN: not defined for this row
        return "—"
    if key == "episodes":
        return f"{int(value):,}"
    shares = ("share_hurt", "action_changed", "high_beats_low")
    return f"{value:.3f}" if key in shares else f"{value:.2f}"


def register(app: typer.Typer) -> None:
    app.command(
        "rollout",
        help=HELP,
        context_settings={"ignore_unknown_options": True},
    )(rollout)
