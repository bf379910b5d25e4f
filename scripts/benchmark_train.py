"""Training throughput: the jitted MADDPG trainer vs a step-by-step Python loop, and the
jitted HATRPO trainer.

Both sides run the same MADDPG networks, the same jitted gradient ``update`` and the
same number of gradient updates per environment step (``updates_per_iteration`` per
``num_envs · episode_length`` steps):

* jitted: ``Trainer.train_chunk`` — JAX Simple Spread vmapped over ``num_envs``
  episodes, ``lax.scan`` over steps, updates and iterations, one call per chunk;
* baseline: mpe2's PettingZoo ``simple_spread_v3`` (``envs.pettingzoo_ref``) stepped
  one transition at a time in Python, the jitted exploratory actor called every step, a
  numpy ring buffer, and the jitted update called every ``steps_per_update`` steps —
  the usual structure of a PyTorch MADDPG training loop.

HATRPO (``agents.hatrpo``, its default config) is on-policy: one update per iteration of
``num_envs`` episodes (a sequential trust-region step per agent and the critic epochs), so
its row counts those updates; it has no Python-loop twin here.

Compilation is excluded from all rates (reported separately); env-steps/s counts
environment transitions (one joint step of all agents), updates included.

With ``--smax MAP`` it times training on a SMAX battle instead (``algo=maddpg_smax`` and
``algo=hatrpo_smax`` settings): both jitted trainers, against a Python loop that steps one
SMAX battle at a time with the jitted env step and the jitted greedy actor and learns
nothing (an upper bound on what a per-step training loop could reach). The padded rows
count the inert steps after a battle ends; the ``auto_reset`` row's steps are all real
battle steps (a finished battle restarts inside the rollout).

    .venv/bin/python scripts/benchmark_train.py [--num-agents 3] [--continuous]
    .venv/bin/python scripts/benchmark_train.py --smax 3s_vs_3z
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from agents import hatrpo, maddpg
from agents.trainer import Trainer
from envs import make_env
from envs.pettingzoo_ref import PettingZooSpread


def time_jitted(trainer: Trainer, chunks: int, updates_per_chunk: int) -> dict[str, float]:
    """Steady-state env-steps/s of ``train_chunk`` (the first, compiling call excluded)."""
    state = trainer.init(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    state, metrics = trainer.train_chunk(state)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(chunks):
        state, metrics = trainer.train_chunk(state)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    steps = chunks * trainer.env_steps_per_chunk
    updates = chunks * updates_per_chunk
    return {"steps": steps, "updates": updates, "seconds": elapsed, "compile_s": compile_s}


def time_python_loop(spec, cfg: maddpg.MaddpgConfig, steps: int, continuous: bool):
    """Env-steps/s of a Python loop over the PettingZoo env with the same update ratio."""
    n, T = spec.num_agents, spec.episode_length
    steps_per_update = cfg.num_envs * T // cfg.updates_per_iteration
    explore = jax.jit(maddpg.make_explore(spec, cfg))
    update = jax.jit(maddpg.make_update(spec, cfg))
    learner = maddpg.init_learner(spec, cfg, jax.random.PRNGKey(0))
    env = PettingZooSpread(n, continuous=continuous, max_cycles=T)
    rng = np.random.default_rng(0)
    key = jax.random.PRNGKey(1)

    cap = cfg.buffer_size
    buf = maddpg.Transition(
        obs=np.zeros((cap, n, spec.obs_dim), np.float32),
        action=np.zeros((cap, n, spec.action_dim), np.float32),
        reward=np.zeros((cap, n), np.float32),
        next_obs=np.zeros((cap, n, spec.obs_dim), np.float32),
        terminal=np.zeros((cap,), np.float32),
        avail=np.ones((cap, n, spec.action_dim), bool),  # Simple Spread: every action legal
        next_avail=np.ones((cap, n, spec.action_dim), bool),
        discount=np.full((cap,), cfg.gamma, np.float32),
    )
    size = pos = 0

    def run(num_steps: int) -> None:
        nonlocal size, pos, learner, key
        obs = env.reset(seed=int(rng.integers(2**31)))
        t = 0
        for step in range(num_steps):
            key, k_act, k_upd = jax.random.split(key, 3)
            actions, encoded = explore(learner.actor_params, obs, None, k_act)
            next_obs, reward, done = env.step(np.asarray(actions))
            buf.obs[pos], buf.action[pos], buf.reward[pos] = obs, encoded, reward
            buf.next_obs[pos] = next_obs
            pos, size = (pos + 1) % cap, min(size + 1, cap)
            obs, t = next_obs, t + 1
            if done or t == T:
                obs, t = env.reset(seed=int(rng.integers(2**31))), 0
            if (step + 1) % steps_per_update == 0:
                idx = rng.integers(size, size=cfg.batch_size)
                batch = maddpg.Transition(*(field[idx] for field in buf))
                learner, _ = update(learner, batch, k_upd)
        jax.block_until_ready(learner)

    t0 = time.perf_counter()
    run(steps_per_update)  # compiles explore and update
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(steps)
    elapsed = time.perf_counter() - t0
    return {
        "steps": steps,
        "updates": steps // steps_per_update,
        "seconds": elapsed,
        "compile_s": compile_s,
    }


def time_smax_loop(env, steps: int) -> dict[str, float]:
    """Env-steps/s of one SMAX battle stepped from Python (jitted step and greedy actor,
    random actor weights, no learning)."""
    cfg = maddpg.MaddpgConfig(sharing="both")
    actor, _ = maddpg.build_networks(env.spec, cfg)
    params = maddpg.init_learner(env.spec, cfg, jax.random.PRNGKey(0)).actor_params
    act = jax.jit(lambda obs, avail: maddpg.greedy_actions(actor, params, obs, avail))
    step, avail_of, reset = jax.jit(env.step), jax.jit(env.avail_actions), jax.jit(env.reset)

    def run(num_steps: int) -> None:
        key, reset_key = jax.random.split(jax.random.PRNGKey(1))
        obs, state = reset(reset_key)
        for t in range(num_steps):
            obs, state, _, done, _ = step(
                jax.random.fold_in(key, t), state, act(obs, avail_of(state))
            )
            if done:
                obs, state = reset(jax.random.fold_in(reset_key, t))
        jax.block_until_ready(obs)

    t0 = time.perf_counter()
    run(2)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(steps)
    return {
        "steps": steps,
        "updates": 0,
        "seconds": time.perf_counter() - t0,
        "compile_s": compile_s,
    }


def smax_main(map_name: str, chunks: int, loop_steps: int) -> None:
    """Training throughput on a SMAX battle (the SMAX rows of the README), with the
    trainers built from configs/algo/maddpg_smax.yaml and hatrpo_smax.yaml."""
    from cli.hydra_entry import compose_config
    from cli.training import build

    results = {}
    # MADDPG with warmup=0: every timed chunk includes its gradient updates
    for label, algo, extra in (
        ("MADDPG", "maddpg_smax", ["algo.warmup=0"]),
        ("HATRPO", "hatrpo_smax", []),
        ("HATRPO auto_reset", "hatrpo_smax", ["algo.auto_reset=true"]),
    ):
        config = compose_config([f"env=smax_{map_name}", f"algo={algo}", *extra])
        env, trainer = build(config)
        updates = config["algo"]["iterations_per_chunk"] * config["algo"].get(
            "updates_per_iteration", 1
        )
        results[f"{label} jitted trainer"] = time_jitted(trainer, chunks, updates)
    print(f"smax {map_name} (N={env.spec.num_agents}, battles padded to "
          f"{env.spec.episode_length} steps); jax backend={jax.default_backend()}")  # fmt: skip
    results["python loop, env+actor only"] = time_smax_loop(env, loop_steps)
    report(results, baseline="python loop, env+actor only")


def report(results: dict[str, dict[str, float]], baseline: str) -> dict[str, float]:
    """Print env-steps/s per row and each row's ratio to ``baseline`` (same run)."""
    rates = {name: r["steps"] / r["seconds"] for name, r in results.items()}
    for name, r in results.items():
        print(
            f"{name:>28}: {rates[name]:10.0f} env-steps/s  ({r['steps']} steps, "
            f"{r['updates']} updates in {r['seconds']:.1f} s; compile {r['compile_s']:.1f} s)"
            f"  {rates[name] / rates[baseline]:6.1f}x {baseline}"
        )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-agents", type=int, default=3)
    parser.add_argument("--continuous", action="store_true")
    parser.add_argument("--chunks", type=int, default=2, help="timed jitted chunks")
    parser.add_argument("--loop-steps", type=int, default=3200, help="timed Python-loop steps")
    parser.add_argument("--smax", metavar="MAP", help="time training on this SMAX map instead")
    args = parser.parse_args()
    if args.smax:
        smax_main(args.smax, args.chunks, args.loop_steps)
        return

    env = make_env("simple_spread", num_agents=args.num_agents, continuous=args.continuous)
    cfg = maddpg.MaddpgConfig(warmup=0)  # defaults; update from the first iteration on
    print(
        f"simple_spread N={args.num_agents} {'continuous' if args.continuous else 'discrete'}; "
        f"num_envs={cfg.num_envs}, {cfg.updates_per_iteration} updates of batch "
        f"{cfg.batch_size} per {cfg.num_envs * env.spec.episode_length} env steps; "
        f"jax backend={jax.default_backend()}"
    )
    hcfg = hatrpo.HatrpoConfig()
    per_chunk = cfg.iterations_per_chunk * cfg.updates_per_iteration
    results = {
        "MADDPG jitted trainer": time_jitted(maddpg.make_trainer(env, cfg), args.chunks, per_chunk),
        "MADDPG python loop": time_python_loop(env.spec, cfg, args.loop_steps, args.continuous),
        "HATRPO jitted trainer": time_jitted(
            hatrpo.make_trainer(env, hcfg), args.chunks, hcfg.iterations_per_chunk
        ),
    }
    report(results, baseline="MADDPG python loop")
    print(
        f"(HATRPO: one update = {hcfg.num_envs} episodes, {hcfg.num_envs * env.spec.episode_length}"
        f" env steps; MADDPG python loop = mpe2 PettingZoo stepped in Python)"
    )


if __name__ == "__main__":
    main()
