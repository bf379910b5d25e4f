"""Recording speed: the paired worst-action protocol through ``cli.recording.record`` vs a
per-step Python loop.

Both sides run the same checkpoint, the same attack (``attack=worst_action``, onsets
high_influence and low_influence, every ordered pair) and the same seeds' keys:

* jitted: ``cli.recording.record`` — what ``forensics rollout`` runs: per chunk of seeds
  one jitted call of ``agents.rollout.make_protocol`` (clean episodes, their critic
  geometry, the onsets, then N(N−1)·2 attacked episodes per seed, ``vmap`` over episodes,
  ``lax.scan`` over steps), each chunk committed to an episode store in a temporary
  directory;
* baseline: one episode at a time, one step at a time in Python: a jitted call for the
  team's greedy actions (with the victim's worst action while the attack is active), a
  jitted env step, the actions pulled to the host; the clean episode's G, D by one jitted
  call per step, then the onsets by one jitted ``attacks.protocol_targets`` call per seed —
  a careful but naive user implementation. Its compilation is excluded; it runs on the
  first ``--loop-seeds`` seeds and its rate is extrapolated per episode. Its actions and
  rewards are compared with the store's for those seeds.

Compilation of the jitted path = first chunk − the median later chunk; steady state = the
chunks after the first, store writes included (the rollout/write split is printed too).

    .venv/bin/python scripts/benchmark_rollout.py [--run RUN_DIR] [--seeds 500]

Without ``--run``: ``runs/simple_spread_5-maddpg-seed0`` if it has a complete checkpoint, else a
smoke checkpoint (``algo=maddpg_smoke env=simple_spread_5``, 200 env steps) trained into a
temporary directory with the networks of ``algo=maddpg`` (``--smoke-hidden``), so that the
timings carry over to a trained checkpoint of the same architecture.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agents import attacks, checkpoint
from agents import rollout as R
from agents.attacks import Attack, Params, Step, Team
from cli import recording
from envs.base import MultiAgentEnv
from forensics import store as st

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "runs" / "simple_spread_5-maddpg-seed0"
SMOKE = [
    "env=simple_spread_5",
    "algo=maddpg_smoke",
    "train.total_env_steps=200",
    "train.eval_episodes=0",
    "train.progress=false",
]


# ------------------------------------------------------------------ the checkpoint
def benchmark_policy(run: Path | None, tmp: Path, smoke_hidden: str) -> checkpoint.Policy:
    """The policy of ``run``; else of ``DEFAULT_RUN`` if it holds a complete checkpoint; else
    of a smoke checkpoint trained into ``tmp`` with hidden layers ``smoke_hidden`` (e.g.
    "64,64") for both the actors and the critics."""
    if run is not None:
        return checkpoint.load_policy(run)
    try:
        return checkpoint.load_policy(DEFAULT_RUN)
    except FileNotFoundError as err:
        why = str(err)
    from rich.console import Console

    from cli import training
    from cli.hydra_entry import compose_config

    hidden = f"[{smoke_hidden}]"
    overrides = [*SMOKE, f"algo.actor_hidden={hidden}", f"algo.critic_hidden={hidden}"]
    config = compose_config([*overrides, f"out_dir={tmp}"])
    run_dir = tmp / config["run_name"]
    print(f"no --run and {why}: training a smoke checkpoint ({' '.join(overrides)})")
    training.run(config, run_dir, console=Console(quiet=True), command="benchmark smoke run")
    return checkpoint.load_policy(run_dir)


def describe(policy: checkpoint.Policy) -> str:
    algo = policy.config["algo"]
    return (
        f"{policy.run_dir} (env step {policy.env_steps:,}; {algo['name']} actor "
        f"{algo['actor_hidden']} critic {algo['critic_hidden']} {algo['activation']})"
    )


# ------------------------------------------------------------------ jitted path
def time_record(
    out: Path, policy: checkpoint.Policy, config: dict, seeds: np.ndarray, chunk_seeds: int
) -> dict[str, float]:
    """Run ``recording.record`` into ``out``; per-chunk wall times come from its progress
    callback (one call up front, then one per committed chunk)."""
    stamps: list[float] = []
    episodes: list[int] = []

    def on_chunk(n: int) -> None:
        stamps.append(time.perf_counter())
        episodes.append(n)

    t0 = time.perf_counter()
    done = recording.record(out, policy, config, seeds, chunk_seeds, on_chunk=on_chunk)
    wall = time.perf_counter() - t0
    chunk_s = np.diff(stamps)  # stamps[0] is the up-front call (0 seeds already recorded)
    chunk_eps = np.asarray(episodes[1:])
    steady = chunk_s[1:]
    first_s = float(chunk_s[0])
    return {
        "episodes": done.episodes,
        "wall_s": wall,
        "compute_s": done.compute_s,
        "write_s": done.write_s,
        "chunks": len(chunk_s),
        "first_chunk_s": first_s,
        "compile_s": first_s - float(np.median(steady)) if len(steady) else float("nan"),
        "steady_episodes": int(chunk_eps[1:].sum()),
        "steady_s": float(steady.sum()),
    }


# ------------------------------------------------------------------ the baseline
class LoopFns(NamedTuple):
    """The per-call jitted pieces of the Python-loop baseline."""

    reset: Callable
    act: Callable
    step: Callable
    geometry: Callable
    targets: Callable


def loop_fns(env: MultiAgentEnv, team: Team, attack: Attack) -> LoopFns:
    spec = env.spec

    def act(actor_params, critic_params, state, obs, victim, observed, active):
        """Every agent's greedy action; the victim's worst action while ``active``."""
        avail = env.avail_actions(state)
        out = jax.vmap(team.actor_apply)(actor_params, obs)
        clean = team.greedy(out, avail)
        info = Step(obs, avail, team.critic_input(clean), victim, observed)
        worst = attacks.worst_action(team, out[victim], info, critic_params, attack.step_size)
        return clean.at[victim].set(jnp.where(active, worst, clean[victim]))

    def step(key, t, state, actions):
        next_obs, next_state, rewards, _, _ = env.step(jax.random.fold_in(key, t), state, actions)
        return next_obs, next_state, rewards

    def geometry(critic_params, obs, actions):
        """G, D [N(j), N(i)] of one step."""
        g, d = attacks.influence_geometry(
            team.critic_apply, critic_params, obs[None], team.critic_input(actions)[None]
        )
        return g[0], d[0]

    def targets(key, g, d):
        return attacks.protocol_targets(
            attack, spec.num_agents, spec.episode_length, R.streams(key).protocol, g, d
        )

    return LoopFns(jax.jit(env.reset), jax.jit(act), jax.jit(step), jax.jit(geometry),
                   jax.jit(targets))  # fmt: skip


def loop_episode(
    fns: LoopFns,
    actor_params: Params,
    critic_params: Params | None,
    key: jax.Array,
    episode_length: int,
    victim: int = 0,
    observed: int = 0,
    start: int = 0,
    window: int = 0,
    geometry: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One episode step by step → (actions [T, N], rewards [T, N], (G, D) [T, N, N] of every
    step when ``geometry``)."""
    keys = R.streams(key)
    obs, state = fns.reset(keys.reset)
    actions, rewards, geo = [], [], []
    for t in range(episode_length):
        active = start <= t < start + window
        a = fns.act(actor_params, critic_params, state, obs, victim, observed, active)
        if geometry:
            geo.append(np.asarray(fns.geometry(critic_params, obs, a)))
        obs, state, r = fns.step(keys.env, t, state, a)
        actions.append(np.asarray(a))
        rewards.append(np.asarray(r))
    g_d = np.stack(geo, axis=1) if geometry else None  # [2, T, N, N]
    return np.stack(actions), np.stack(rewards), g_d


def loop_protocol_seed(
    fns: LoopFns, actor_params: Params, critic_params: Params | None, seed: int, T: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seed's clean episode then its attacked ones, in store order → actions [1 + M, T, N],
    rewards [1 + M, T, N]."""
    key = jax.random.PRNGKey(seed)
    act, rew, (g, d) = loop_episode(fns, actor_params, critic_params, key, T, geometry=True)
    target, _, _ = fns.targets(key, g, d)
    target = jax.device_get(target)
    acts, rews = [act], [rew]
    for m in range(len(target.victim)):
        a, r, _ = loop_episode(
            fns, actor_params, critic_params, key, T,
            int(target.victim[m]), int(target.observed[m]),
            int(target.start[m]), int(target.window[m]),
        )  # fmt: skip
        acts.append(a)
        rews.append(r)
    return np.stack(acts), np.stack(rews)


def time_loop(
    env: MultiAgentEnv,
    team: Team,
    attack: Attack,
    actor_params: Params,
    critic_params: Params | None,
    seeds: np.ndarray,
) -> tuple[dict[str, float], dict[int, tuple[np.ndarray, np.ndarray]]]:
    fns = loop_fns(env, team, attack)
    T = env.spec.episode_length
    t0 = time.perf_counter()
    # compile every piece (one short episode with geometry, the targets, one attacked step)
    key = jax.random.PRNGKey(int(seeds[0]))
    _, _, (g, d) = loop_episode(fns, actor_params, critic_params, key, T, geometry=True)
    jax.block_until_ready(fns.targets(key, g, d))
    compile_s = time.perf_counter() - t0
    out = {}
    t0 = time.perf_counter()
    for s in seeds.tolist():
        out[s] = loop_protocol_seed(fns, actor_params, critic_params, s, T)
    elapsed = time.perf_counter() - t0
    episodes = sum(len(a) for a, _ in out.values())
    return {"episodes": episodes, "seconds": elapsed, "compile_s": compile_s}, out


def agreement(store_path: Path, loop: dict[int, tuple[np.ndarray, np.ndarray]]) -> str:
    """How many of the loop's episodes have the store's actions (exactly) and rewards."""
    store = st.open_store(store_path)
    same_actions = close_rewards = total = 0
    for b in store.iter_batches(["seed", "episode_id", "actions", "rewards"], 4096):
        for s, (acts, rews) in loop.items():
            sel = b["seed"] == s
            if not sel.any():
                continue
            order = np.argsort(b["episode_id"][sel])
            a, r = b["actions"][sel][order], b["rewards"][sel][order]
            same_actions += int(np.sum(np.all(a == acts, axis=(1, 2))))
            close_rewards += int(np.sum(np.all(np.isclose(r, rews, atol=1e-5), axis=(1, 2))))
            total += len(a)
    return (
        f"{same_actions}/{total} episodes with identical actions, "
        f"{close_rewards}/{total} with equal rewards (atol 1e-5)"
    )


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="run directory (a checkpoint)")
    parser.add_argument("--seeds", type=int, default=500, help="seeds 0..S-1 to record")
    parser.add_argument("--chunk-seeds", type=int, default=32, help="seeds per jitted chunk")
    parser.add_argument("--loop-seeds", type=int, default=8, help="seeds for the Python loop")
    parser.add_argument("--smoke-hidden", default="64,64", help="smoke checkpoint's layers")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        tmp = Path(tmp)
        policy = benchmark_policy(args.run, tmp, args.smoke_hidden)
        config = recording.rollout_config([], policy.config, policy.run_dir)
        attack = Attack.from_config(config["attack"])
        spec = policy.env.spec
        per_seed = recording.episodes_per_seed(attack, spec.num_agents)
        seeds = np.arange(args.seeds)
        print(f"checkpoint: {describe(policy)}")
        print(
            f"simple_spread N={spec.num_agents}, T={spec.episode_length}; attack "
            f"{attack.name} window {attack.window}, onsets {'+'.join(attack.start)}; "
            f"{args.seeds} seeds × {per_seed} episodes = {args.seeds * per_seed:,} episodes "
            f"in chunks of {args.chunk_seeds} seeds; Python loop on {args.loop_seeds} seeds "
            f"({args.loop_seeds * per_seed} episodes); jax backend={jax.default_backend()}"
        )
        jit = time_record(tmp / "store", policy, config, seeds, args.chunk_seeds)
        team, actor_params, critic_params = recording.team_of(policy)
        loop, loop_out = time_loop(
            policy.env, team, attack, actor_params, critic_params, seeds[: args.loop_seeds]
        )
        check = agreement(tmp / "store", loop_out)

    steady_rate = jit["steady_episodes"] / jit["steady_s"]
    loop_rate = loop["episodes"] / loop["seconds"]
    loop_total = jit["episodes"] / loop_rate
    print(
        f"{'jitted record':>22}: {steady_rate:10.1f} episodes/s steady state "
        f"({jit['steady_episodes']:,} episodes in {jit['steady_s']:.1f} s, store writes "
        f"included); compile {jit['compile_s']:.1f} s (first chunk {jit['first_chunk_s']:.1f} s)"
    )
    print(
        f"{'':>22}  all {jit['episodes']:,} episodes: {jit['wall_s']:.1f} s wall "
        f"(rollouts {jit['compute_s']:.1f} s incl. compilation, store writes "
        f"{jit['write_s']:.1f} s, {jit['chunks']} chunks)"
    )
    print(
        f"{'python loop':>22}: {loop_rate:10.1f} episodes/s "
        f"({loop['episodes']} episodes in {loop['seconds']:.1f} s; compile "
        f"{loop['compile_s']:.1f} s) → {jit['episodes']:,} episodes ≈ {loop_total:.0f} s"
    )
    print(
        f"{'speed-up':>22}: {steady_rate / loop_rate:10.1f}x steady state, "
        f"{loop_total / jit['wall_s']:.1f}x end to end (compile and writes included)"
    )
    print(f"{'agreement':>22}: {check}")


if __name__ == "__main__":
    main()
