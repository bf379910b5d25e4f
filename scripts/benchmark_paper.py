"""The paper's whole protocol, end to end: vectorised (this repository) vs its per-step loop.

Per seed (Simple Spread N = 3, MADDPG): the clean episode and its critic geometry (onsets of
every ordered pair: largest G with D > 0 / smallest G with D < 0 in t < ceil(0.25·T)), the
attacked episodes (worst action for 5 steps), R = 100 clean replays of the seed with
N(0, (1e-4)²) observation noise and the paper's Stage-1 statistic on each (the band μ, σ),
the statistic on every attacked episode, its flags against the band, the candidate (raw-
deviation tie-break), and Stage 2 (G, D at the pre-attack actions; the MADDPG traceback).

* vectorised: ``agents.rollout.make_protocol`` (clean + attacked episodes, onsets from the
  clean geometry), ``agents.replay_band.make_band`` (replays + statistic + μ, σ in one jitted
  program), ``forensics.paper.paper_measure`` + ``band_flags`` + ``earliest_candidate`` +
  ``traceback_maddpg``. Timed cold (compilation included) and warm (a second identical run).
* per-step: the paper's code's loop structure (``reference_taylor.py``, ``episode_runner.py``)
  re-implemented with single-sample jitted JAX calls: per replay and step, one call per agent
  for its action and one for its Taylor statistic, a call for the noise and one env step; per
  attacked step additionally one call per ordered pair for G and one for D (the code's
  ``compute_pairwise_action_influences`` / ``..._directional_second_derivatives``) and the
  victim's worst action; detection, onsets and the traceback in Python as the code does. Its
  compilation is excluded (warmed first). It runs ``--naive-seeds`` seeds and is extrapolated
  per seed; its band means and candidates must equal the vectorised ones on those seeds.

    .venv/bin/python scripts/benchmark_paper.py [--run RUN] [--seeds 100] [--naive-seeds 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import deque
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from agents import rollout as R
from agents.attacks import Attack, Team, agent_slice
from agents.replay_band import iter_bands, make_band, noise_keys
from forensics import paper as P
from forensics.diagnose import model_from_policy
from forensics.stage1 import _agent_step_score, stage1_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_rollout import benchmark_policy, describe  # noqa: E402

NOISE = 1e-4


# ------------------------------------------------------------------ vectorised
def programs(policy, inst, replays: int):
    """The jitted protocol (clean + attacked episodes) and band programs, built once."""
    spec = policy.env.spec
    team = Team(spec, inst.actor_apply, inst.critic_apply)
    horizon = P.search_horizon("maddpg", spec.episode_length)
    attack = Attack(name="worst_action", search_fraction=horizon / spec.episode_length)
    stat = lambda p, rep: (
        stage1_scores(inst.actor_apply, p, rep.obs, rep.avail, cfg=inst.stage1).smooth,
    )
    return R.make_protocol(policy.env, team, attack), make_band(policy.env, team, stat, replays)


def vectorised(progs, inst, params, seeds: np.ndarray, chunk: int):
    """The whole protocol for ``seeds``; returns (band μ [S, T, N], candidates [S, M],
    fell_back [S, M], wall s)."""
    protocol, band_fn = progs
    t0 = time.perf_counter()
    chunk_out = protocol(params["actor"], params["critic"], seeds)
    band = iter_bands(band_fn, params["actor"], params["actor"], R.seed_keys(seeds), NOISE, chunk)
    ep = chunk_out.attacked
    s, m = ep.done.shape[:2]
    flat = lambda x: x.reshape(s * m, *x.shape[2:])
    raw, smooth, G, D = P.paper_measure(inst, params, flat(ep.obs_perceived), flat(ep.avail))
    rows = np.repeat(np.arange(s), m)
    mu, sigma = jnp.asarray(band.mu[0][rows]), jnp.asarray(band.sigma[0][rows])
    valid = flat(jnp.cumsum(ep.done, axis=-1) - ep.done == 0)
    e = P.earliest_candidate(P.band_flags(smooth, mu, sigma, 2.0, 0.0, valid), jnp.abs(raw - mu))
    head, _ = P.traceback_maddpg(G, D, e.t_det, e.candidate)
    jax.block_until_ready(head)
    wall = time.perf_counter() - t0
    fell = np.asarray(chunk_out.fell_back)
    return band.mu[0], np.asarray(e.candidate).reshape(s, m), fell, wall


# ------------------------------------------------------------------ per-step loop
class Naive:
    """Single-sample jitted calls, one per agent / pair and step, as the paper's loop."""

    def __init__(self, policy, inst, params, replays: int):
        self.env, self.inst, self.replays = policy.env, inst, replays
        spec = policy.env.spec
        self.n, self.t_len, self.a_dim = spec.num_agents, spec.episode_length, spec.action_dim
        self.actor = [agent_slice(params["actor"], i) for i in range(self.n)]
        self.critic = [agent_slice(params["critic"], j) for j in range(self.n)]
        self.reset = jax.jit(self.env.reset)
        self.step = jax.jit(self.env.step)
        self.avail = jax.jit(self.env.avail_actions)
        logits = lambda p, o, av: jnp.where(av, inst.actor_apply(p, o), -jnp.inf)
        self.act = jax.jit(lambda p, o, av: jnp.argmax(logits(p, o, av)))
        self.worst = jax.jit(lambda p, o, av: jnp.argmin(jnp.where(av, logits(p, o, av), jnp.inf)))
        self.stat = jax.jit(partial(_agent_step_score, inst.actor_apply, inst.stage1, None))
        self.noise = jax.jit(lambda k, t, shape: jax.random.normal(jax.random.fold_in(k, t), shape),
                             static_argnums=2)  # fmt: skip
        onehot = lambda a: jax.nn.one_hot(a, self.a_dim, dtype=jnp.float32)
        q = lambda pj, obs, act: inst.critic_apply(pj, obs, onehot(act))

        def g_of(pj, obs, act, i):
            return jax.grad(lambda a: inst.critic_apply(pj, obs, a))(onehot(act))[i]

        def d_of(pj, obs, act, i):
            grad = jax.grad(lambda a: inst.critic_apply(pj, obs, a))
            g = grad(onehot(act))
            tangent = jnp.zeros_like(g).at[i].set(g[i])
            hg = jax.jvp(grad, (onehot(act),), (tangent,))[1][i]
            return -jnp.dot(g[i], hg)

        self.q = jax.jit(q)
        self.G = jax.jit(lambda pj, obs, act, i: jnp.linalg.norm(g_of(pj, obs, act, i)))
        self.D = jax.jit(d_of)
        self.fold = jax.jit(jax.random.fold_in)

    def _actions(self, obs, av):
        return [int(self.act(self.actor[i], obs[i], av[i])) for i in range(self.n)]

    def _stats(self, obs, av):
        return [float(self.stat(self.actor[i], obs[i], av[i], 0)) for i in range(self.n)]

    def _geometry(self, obs, actions):
        a = jnp.asarray(actions)
        G = np.zeros((self.n, self.n))
        D = np.zeros((self.n, self.n))
        for j in range(self.n):
            for i in range(self.n):
                if i != j:
                    G[j, i] = float(self.G(self.critic[j], obs, a, i))
                    D[j, i] = float(self.D(self.critic[j], obs, a, i))
        return G, D

    def band(self, key):
        ks = R.streams(key)
        nkeys = noise_keys(key[None], self.replays)[0]
        vals = np.zeros((self.replays, self.t_len, self.n))
        for r in range(self.replays):
            obs, state = self.reset(ks.reset)
            dq = [deque(maxlen=5) for _ in range(self.n)]
            for t in range(self.t_len):
                obs = obs + NOISE * self.noise(nkeys[r], t, obs.shape)
                av = self.avail(state)
                actions = self._actions(obs, av)
                for i, x in enumerate(self._stats(obs, av)):
                    dq[i].append(x)
                    vals[r, t, i] = np.mean(dq[i])
                obs, state, _, _, _ = self.step(self.fold(ks.env, t), state, jnp.asarray(actions))
        return vals.mean(0), vals.std(0)

    def onsets(self, key):
        """(victim, observed, start) of every attacked episode of the seed (skipped pairs out)."""
        ks = R.streams(key)
        obs, state = self.reset(ks.reset)
        Gs, Ds = [], []
        for t in range(self.t_len):
            av = self.avail(state)
            actions = self._actions(obs, av)
            G, D = self._geometry(obs, actions)
            Gs.append(G)
            Ds.append(D)
            obs, state, _, _, _ = self.step(self.fold(ks.env, t), state, jnp.asarray(actions))
        h = math.ceil(0.25 * self.t_len)
        out = []
        for i in range(self.n):
            for j in range(self.n):
                if i == j:
                    continue
                hi = [(Gs[t][j, i], t) for t in range(h) if Ds[t][j, i] > 0]
                lo = [(Gs[t][j, i], t) for t in range(h) if Ds[t][j, i] < 0]
                out.append((i, j, max(hi)[1] if hi else None))
                out.append((i, j, min(lo)[1] if lo else None))
        return out

    def attacked(self, key, victim, start, mu, sd):
        """One attacked episode with the code's per-step detection; returns (candidate, head)."""
        ks = R.streams(key)
        obs, state = self.reset(ks.reset)
        dq = [deque(maxlen=5) for _ in range(self.n)]
        raw_hist, G_hist, D_hist, timeline = [], [], [], []
        for t in range(self.t_len):
            av = self.avail(state)
            actions = self._actions(obs, av)
            G, D = self._geometry(obs, actions)
            G_hist.append(G)
            D_hist.append(D)
            raw = self._stats(obs, av)
            raw_hist.append(raw)
            for i in range(self.n):
                dq[i].append(raw[i])
                x = np.mean(dq[i])
                if abs(x - mu[t, i]) > 2.0 * sd[t, i] and not np.isclose(x, mu[t, i], 1e-5, 1e-5):
                    timeline.append((t, i))
            if start <= t < start + 5:
                actions[victim] = int(self.worst(self.actor[victim], obs[victim], av[victim]))
            obs, state, _, _, _ = self.step(self.fold(ks.env, t), state, jnp.asarray(actions))
        if not timeline:
            return -1, -1
        t_det = min(t for t, _ in timeline)
        first = [i for t, i in timeline if t == t_det]
        cand = max(first, key=lambda i: (abs(raw_hist[t_det][i] - mu[t_det, i]), -i))
        chain, current = [cand], cand
        while True:  # the code's recursive traceback
            best = None
            for u in range(self.n):
                if u == current:
                    continue
                steps = range(max(0, t_det - 4), t_det + 1)
                count = sum(D_hist[t][current, u] > 0 for t in steps)
                score = count * G_hist[t_det][current, u]
                if best is None or score > best[2]:
                    best = (u, count / len(steps), score)
            if best[1] <= 0 or best[0] in chain:
                return cand, current
            chain.append(best[0])
            current = best[0]

    def seed(self, seed: int):
        key = R.seed_keys(np.asarray([seed]))[0]
        mu, sd = self.band(key)
        cands = [
            self.attacked(key, i, s, mu, sd)[0] if s is not None else None
            for i, _, s in self.onsets(key)
        ]
        return mu, cands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="run directory (MADDPG N=3)")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--replays", type=int, default=100)
    parser.add_argument("--naive-seeds", type=int, default=2, help="seeds the loop runs")
    parser.add_argument("--chunk", type=int, default=25, help="seeds per band call")
    parser.add_argument("--out", type=Path, default=None, help="append results rows here")
    parser.add_argument("--commit", default="unknown", help="code version for the rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = benchmark_policy(args.run, Path(tmp), "64,64")
    print(f"policy: {describe(policy)}; device {jax.devices()[0]}")
    model = model_from_policy(policy, P.PAPER_STAGE1)
    inst, params = model.instruments, model.params
    seeds = np.arange(args.seeds)
    progs = programs(policy, inst, args.replays)
    _, _, _, cold = vectorised(progs, inst, params, seeds, args.chunk)
    mu, cand, fell, warm = vectorised(progs, inst, params, seeds, args.chunk)
    m = cand.shape[1]
    print(
        f"vectorised: {args.seeds} seeds × ({args.replays} replays + {m} attacked episodes), "
        f"Stage 1 + 2: {cold:.2f} s cold (compilation included), {warm:.2f} s warm"
    )
    naive = Naive(policy, inst, params, args.replays)
    naive.seed(int(seeds[-1]))  # warm every single-sample call (compilation excluded)
    t0 = time.perf_counter()
    checks = []
    for k in range(args.naive_seeds):
        mu_n, cands = naive.seed(int(seeds[k]))
        checks.append(np.allclose(mu_n, mu[k], rtol=1e-4, atol=1e-6))
        kept = [(e, c) for e, c in enumerate(cands) if c is not None]
        checks.append(all(int(cand[k, e]) == c for e, c in kept))
        checks.append(sum(c is None for c in cands) == int(fell[k].sum()))
    per_seed = (time.perf_counter() - t0) / args.naive_seeds
    total = per_seed * args.seeds
    print(
        f"per-step loop: {per_seed:.1f} s per seed ({args.naive_seeds} seeds run) → "
        f"{total:,.0f} s for {args.seeds} seeds (extrapolated); "
        f"matches the vectorised band and candidates: {all(checks)}"
    )
    print(f"speed-up end to end: {total / warm:,.0f}× warm, {total / cold:,.0f}× cold")
    if args.out is not None:
        from forensics.results import append_rows

        spec = policy.env.spec
        common = {
            "env": spec.name, "algo": policy.config["algo"]["name"], "n_agents": spec.num_agents,
            "fault": "worst_action", "setting": "benchmark", "subset": "all",
            "episodes": args.seeds * (args.replays + m + 1), "device": str(jax.devices()[0]),
            "command": " ".join(["scripts/benchmark_paper.py", *sys.argv[1:]]),
            "commit": args.commit,
        }  # fmt: skip
        figures = [
            ("vectorised", "wall_s_warm", warm), ("vectorised", "wall_s_cold", cold),
            ("per-step loop", "wall_s_extrapolated", total),
            ("vectorised", "speedup_warm", total / warm),
            ("vectorised", "speedup_cold", total / cold),
        ]  # fmt: skip
        rows = [{**common, "instrument": i, "metric": k, "value": v} for i, k, v in figures]
        append_rows(args.out, rows)
        print(f"Wrote {len(rows)} rows to {args.out}")
    if not all(checks):
        raise SystemExit("the per-step loop disagrees with the vectorised protocol")


if __name__ == "__main__":
    main()
