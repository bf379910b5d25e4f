"""Per-agent mean episode return of uniform-random and scripted policies in the JAX env.

Usage: .venv/bin/python scripts/spread_baselines.py [--episodes 200]
Prints one row per (N, action type) next to the DESIGN.md reference values.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from envs.simple_spread import REFERENCE_RETURNS, REFERENCE_RETURNS_SOURCE, SimpleSpread


def policy_returns(env: SimpleSpread, key: jax.Array, episodes: int, scripted: bool) -> jax.Array:
    """Per-agent return Σ_t r_t^i averaged over agents, one value per episode [E]."""
    n = env.num_agents

    def act(k: jax.Array, state) -> jax.Array:
        if scripted:
            return env.scripted_actions(state)
        if env.continuous:
            return jax.random.uniform(k, (n, 5))
        return jax.random.randint(k, (n,), 0, 5)

    def episode(k: jax.Array) -> jax.Array:
        k_reset, k_steps = jax.random.split(k)
        _, state = env.reset(k_reset)

        def body(state, k):
            _, state, rew, _, _ = env.step(k, state, act(k, state))
            return state, rew

        _, rew = jax.lax.scan(body, state, jax.random.split(k_steps, env.max_cycles))
        return rew.sum(0).mean()

    return jax.jit(jax.vmap(episode))(jax.random.split(key, episodes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"reference: {REFERENCE_RETURNS_SOURCE}")
    print(f"{'N':>2} {'actions':>10} {'random':>15} {'ref':>6} {'scripted':>15} {'ref':>6}")
    for (n, continuous), ref in sorted(REFERENCE_RETURNS.items()):
        env = SimpleSpread(n, continuous)
        key = jax.random.PRNGKey(args.seed)
        cells = []
        for scripted in (False, True):
            r = policy_returns(env, key, args.episodes, scripted)
            se = jnp.std(r) / jnp.sqrt(args.episodes)
            cells.append(f"{float(r.mean()):7.2f} ± {float(se):4.2f}")
        kind = "continuous" if continuous else "discrete"
        print(
            f"{n:>2} {kind:>10} {cells[0]:>15} {ref['random']:6.1f} {cells[1]:>15} "
            f"{ref['scripted']:6.1f}"
        )


if __name__ == "__main__":
    main()
