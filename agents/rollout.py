"""Jitted, vectorised evaluation rollouts with one attacked agent, replay and counterfactuals.

One episode is a ``lax.scan`` over its T steps; episodes are ``vmap``-ped. Every agent
acts greedily (masked argmax of its logits, or its deterministic action). At step t:

  clean_actions_t = greedy π(o_t)                      (every agent, true obs, clean θ)
  õ_t             = perceive(o_t)                      (victim only, while active)
  actions_t       = clean_actions_t with the victim's entry replaced by
                    act(π_{θ̃_i}(õ_{i,t}))               while active(t)
  o_{t+1}, r_t    = env.step(actions_t)

Faults with a memory (a frozen or lagged reading, a delayed command: ``attacks.Memory``)
carry it in the scan next to the env state; it is written at every step, so the window
can look back before its onset.

Randomness: an episode is a pure function of (key, target, params). ``key`` is split into
independent streams for the env reset, the env steps, the attack noise and the protocol's
draws, so removing the attack (``Target.window = 0``) leaves the env's randomness unchanged:
that is the counterfactual. Recording ``key`` and ``target`` per episode is enough to
regenerate it exactly; ``replay_actions`` re-steps the env open-loop from the recorded key
and actions without any network.

Arrays returned (leading batch shape B..., then T steps, N agents, O obs, A actions):
  obs_true, obs_perceived  float32 [B.., T, N, O]
  actions, clean_actions   int32 [B.., T, N] (discrete) | float32 [B.., T, N, A]
  critic_actions           float32 [B.., T, N, A] (one-hot when discrete)
  rewards                  float32 [B.., T, N]
  avail                    bool [B.., T, N, A]
  done, active             bool [B.., T]
  key                      uint32 [B.., 2]
  target                   ``attacks.Target`` of int32 [B..]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from agents import attacks
from agents.attacks import START_MODES, Attack, Memory, Params, Step, Target, Team
from agents.precision import float32_matmuls
from envs.base import EnvSpec, MultiAgentEnv


class Episode(NamedTuple):
    obs_true: jax.Array
    obs_perceived: jax.Array
    actions: jax.Array
    clean_actions: jax.Array
    critic_actions: jax.Array
    rewards: jax.Array
    avail: jax.Array
    done: jax.Array
    active: jax.Array
    key: jax.Array
    target: Target


class Streams(NamedTuple):
    reset: jax.Array
    env: jax.Array
    attack: jax.Array
    protocol: jax.Array


def streams(key: jax.Array) -> Streams:
    """Independent key streams of one episode key."""
    return Streams(*jax.random.split(key, 4))


def seed_keys(seeds: jax.Array) -> jax.Array:
    """Episode key of each integer seed: PRNGKey(seed), uint32 [S, 2]."""
    return jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.int32))


def check_params(attack: Attack, team: Team, critic_params: Params | None) -> None:
    """Attacks that differentiate a critic need one (and the attack must suit the env)."""
    attack.check_env(team.spec)
    if attack.needs_critic(team.spec) and (critic_params is None or team.critic_apply is None):
        raise ValueError(
            f"attack.name: {attack.name!r} on {team.spec.name} needs a Q critic "
            "(critic_apply and critic params); none given"
        )


class StepRecord(NamedTuple):
    """What one step records besides the env's rewards and done (one episode, [N, ...])."""

    obs_true: jax.Array
    obs_perceived: jax.Array
    actions: jax.Array
    clean_actions: jax.Array
    critic_actions: jax.Array
    avail: jax.Array
    active: jax.Array


class Attacker(NamedTuple):
    """An episode's fixed attack inputs: its target, the victim's (possibly corrupted)
    actor params, the key of the per-step attack noise and the key of the draws fixed for
    the whole episode (a bias direction, a lost actuator axis)."""

    target: Target
    victim_params: Params
    step_key: jax.Array
    episode_key: jax.Array


def start_attack(
    attack: Attack, spec: EnvSpec, actor_params: Params, key: jax.Array, target: Target
) -> tuple[Attacker, Memory]:
    """(the episode's ``Attacker``, the fault's initial ``Memory``) from its key and target."""
    k_params, k_steps = jax.random.split(streams(key).attack)
    victim_params = attacks.agent_slice(
        attacks.corrupt_params(attack, k_params, actor_params, target.victim), target.victim
    )
    # fold_in, not a third split: the existing streams (and their episodes) stay as they were
    episode_key = jax.random.fold_in(k_params, 1)
    return Attacker(target, victim_params, k_steps, episode_key), attacks.initial_memory(
        attack, spec
    )


def attacked_step(
    team: Team,
    attack: Attack,
    actor_params: Params,
    critic_params: Params | None,
    attacker: Attacker,
    obs: jax.Array,
    avail: jax.Array,
    memory: Memory,
    t: jax.Array,
) -> tuple[jax.Array, Memory, StepRecord]:
    """One step's decisions (the module docstring's equations) from the true obs [N, O] and
    legal actions [N, A] at step t: (actions to send to the env, the fault's memory carried
    to t + 1, the step's record). The env itself is stepped by the caller, so that the same
    function serves the jitted scan and Python-stepped envs (``make_player``)."""
    target, victim = attacker.target, attacker.target.victim
    clean_act = team.greedy(jax.vmap(team.actor_apply)(actor_params, obs), avail)
    clean_crit = team.critic_input(clean_act)
    memory = attacks.remember_obs(attack, memory, obs[victim], t, target.start)
    info = Step(
        obs, avail, clean_crit, victim, target.observed,
        t, target.start, target.window, memory, attacker.episode_key,
    )  # fmt: skip
    k_obs, k_act = jax.random.split(jax.random.fold_in(attacker.step_key, t))
    active = attacks.is_active(target, t)
    obs_v = attacks.perceive(attack, team, k_obs, info, attacker.victim_params, critic_params)
    out_v = team.actor_apply(attacker.victim_params, obs_v)
    latched = jnp.where(t == target.start, clean_act[victim], memory.latched)
    decision = team.greedy(out_v, avail[victim])
    memory = attacks.remember_act(attack, team.spec, memory._replace(latched=latched), decision, t)
    info = info._replace(memory=memory)
    act_v = attacks.act(attack, team, k_act, info, out_v, latched, critic_params)
    actions = clean_act.at[victim].set(jnp.where(active, act_v, clean_act[victim]))
    obs_seen = obs.at[victim].set(jnp.where(active, obs_v, obs[victim]))
    record = StepRecord(
        obs, obs_seen, actions, clean_act, team.critic_input(actions), avail, active
    )
    return actions, memory, record


def _episode(
    env: MultiAgentEnv,
    team: Team,
    attack: Attack,
    actor_params: Params,
    critic_params: Params | None,
    key: jax.Array,
    target: Target,
) -> Episode:
    """One greedy episode (T steps) with ``attack`` applied to ``target``."""
    spec = env.spec
    keys = streams(key)
    obs0, state0 = env.reset(keys.reset)
    attacker, memory0 = start_attack(attack, spec, actor_params, key, target)

    def step(carry, t):
        state, obs, memory = carry
        avail = env.avail_actions(state)
        actions, memory, rec = attacked_step(
            team, attack, actor_params, critic_params, attacker, obs, avail, memory, t
        )
        next_obs, next_state, rewards, done, _ = env.step(
            jax.random.fold_in(keys.env, t), state, actions
        )
        return (next_state, next_obs, memory), (rec, rewards, done)

    steps = jnp.arange(spec.episode_length, dtype=jnp.int32)
    _, (rec, rewards, done) = jax.lax.scan(step, (state0, obs0, memory0), steps)
    return as_episode(rec, rewards, done, key, target)


def as_episode(
    rec: StepRecord, rewards: jax.Array, done: jax.Array, key: jax.Array, target: Target
) -> Episode:
    """The ``Episode`` of stacked step records [T, ...] and the env's rewards and done."""
    return Episode(
        obs_true=rec.obs_true,
        obs_perceived=rec.obs_perceived,
        actions=rec.actions,
        clean_actions=rec.clean_actions,
        critic_actions=rec.critic_actions,
        rewards=rewards,
        avail=rec.avail,
        done=done,
        active=rec.active,
        key=key,
        target=target,
    )


def episode_length(done: jax.Array) -> jax.Array:
    """Steps played up to and including the first done, int32 [B..] from done [B.., T]
    (T when the episode never ends inside the scan)."""
    t = done.shape[-1]
    return jnp.where(jnp.any(done, axis=-1), jnp.argmax(done, axis=-1) + 1, t).astype(jnp.int32)


def _batched(one: Callable[..., Episode]) -> Callable[..., Episode]:
    """Lift ``one(actor_params, critic_params, key [2], target [])`` to keys [B.., 2] and
    targets [B..] of any leading batch shape (flattened for a single vmap)."""

    def many(actor_params, critic_params, keys, targets):
        batch = keys.shape[:-1]
        size = int(np.prod(batch, dtype=int))
        # XLA lowers a batch of one to matrix-vector products whose float rounding differs
        # from the batched matrix products; pad to two so replays stay bit-exact.
        width = max(size, 2)
        flat = jax.tree_util.tree_map(
            lambda x: _pad_rows(x.reshape(size, *x.shape[len(batch) :]), width), (keys, targets)
        )
        out = jax.vmap(one, in_axes=(None, None, 0, 0))(actor_params, critic_params, *flat)
        return jax.tree_util.tree_map(lambda x: x[:size].reshape(*batch, *x.shape[1:]), out)

    return many


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """Repeat the last row of x until it has ``rows`` rows."""
    return jnp.concatenate([x, jnp.repeat(x[-1:], rows - x.shape[0], axis=0)])


def make_rollout(
    env: MultiAgentEnv, team: Team, attack: Attack
) -> Callable[[Params, Params | None, jax.Array, Target], Episode]:
    """``rollout(actor_params, critic_params, keys [B.., 2], targets [B..]) -> Episode [B..]``.

    Jitted; the batch may have any leading shape (keys carry a trailing 2). Clean episodes
    are targets with window 0 (``attacks.clean_target``).
    """

    # float32 products: the same episodes on a GPU as on the CPU (agents/precision.py)
    batched = float32_matmuls(jax.jit(_batched(partial(_episode, env, team, attack))))

    def rollout(actor_params, critic_params, keys, targets):
        check_params(attack, team, critic_params)
        return batched(actor_params, critic_params, keys, targets)

    return rollout


# ------------------------------------------------------------- Python-stepped envs
def make_player(
    env: Any, team: Team, attack: Attack
) -> Callable[[Params, Params | None, jax.Array, Target], Episode]:
    """``play(actor_params, critic_params, key [2], target []) -> Episode`` (numpy, one
    episode) for an env stepped from Python, such as the real StarCraft II game
    (``envs.sc2.Sc2Env``), which cannot be traced.

    Each step runs ``attacked_step`` — the very function ``_episode`` scans — jitted once;
    ``env.reset``/``env.step`` get the same key streams as in ``_episode``. After the
    env's ``done`` it is not stepped again: the remaining steps record what a frozen SMAX
    battle records in the scan (the last observation and masks, zero reward, done), so
    the episode has T steps either way and ``valid`` marks the same steps.
    """
    spec = env.spec
    start = jax.jit(partial(start_attack, attack, spec))
    step = jax.jit(partial(attacked_step, team, attack))
    no_reward = np.zeros(spec.num_agents, np.float32)

    def play(actor_params, critic_params, key, target):
        check_params(attack, team, critic_params)
        keys = streams(key)
        obs, state = env.reset(keys.reset)
        attacker, memory = start(actor_params, key, target)
        records, rewards, dones = [], [], []
        done = False
        # The project's one Python loop over steps: the game steps itself, a few
        # milliseconds per step, far slower than this loop's dispatch.
        for t in range(spec.episode_length):
            avail = env.avail_actions(state)
            t32 = np.int32(t)
            actions, memory, rec = step(
                actor_params, critic_params, attacker, obs, avail, memory, t32
            )
            reward = no_reward
            if not done:
                obs, state, reward, done, _ = env.step(
                    jax.random.fold_in(keys.env, t32), state, actions
                )
                done = bool(done)
            records.append(rec)
            rewards.append(np.asarray(reward, np.float32))
            dones.append(done)
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *records)
        return as_episode(stacked, np.stack(rewards), np.asarray(dones), np.asarray(key), target)

    return play


# ------------------------------------------------------------------- replay & cf
def replay_actions(
    env: MultiAgentEnv, key: jax.Array, actions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Open-loop replay: reset from the recorded key and step the recorded actions.

    Returns (obs_true [T, N, O], rewards [T, N]); no network is involved, so it checks
    that the env alone reproduces a recorded episode. vmap it for a batch.
    """
    keys = streams(key)
    obs0, state0 = env.reset(keys.reset)

    def step(carry, xs):
        state, obs = carry
        t, a = xs
        next_obs, next_state, rewards, _, _ = env.step(jax.random.fold_in(keys.env, t), state, a)
        return (next_state, next_obs), (obs, rewards)

    ts = jnp.arange(actions.shape[0], dtype=jnp.int32)
    _, (obs, rewards) = jax.lax.scan(step, (state0, obs0), (ts, actions))
    return obs, rewards


def counterfactual(
    rollout: Callable, actor_params: Params, critic_params: Params | None, episodes: Episode
) -> Episode:
    """The same episodes (same keys, same compiled rollout) with the attack removed."""
    return rollout(
        actor_params,
        critic_params,
        episodes.key,
        episodes.target._replace(window=jnp.zeros_like(episodes.target.window)),
    )


class Divergence(NamedTuple):
    """Per agent, the first step at which the attacked episode departs from its
    counterfactual (T = never). int32 [B.., N] each."""

    action: jax.Array  # its action differs (discrete: ≠; continuous: max |Δ| > tol)
    obs: jax.Array  # its true observation differs (max |Δ| > tol)
    first: jax.Array  # min of the two


def _first_true(mask: jax.Array, time_axis: int) -> jax.Array:
    """Index of the first True along ``time_axis``; its length when none."""
    t = mask.shape[time_axis]
    return jnp.where(jnp.any(mask, axis=time_axis), jnp.argmax(mask, axis=time_axis), t).astype(
        jnp.int32
    )


@jax.jit
def divergence(attacked: Episode, clean: Episode, tol: float = 1e-5) -> Divergence:
    """Divergence times of every agent between paired episodes of equal shape."""
    time_axis = attacked.rewards.ndim - 2
    obs_diff = jnp.max(jnp.abs(attacked.obs_true - clean.obs_true), axis=-1) > tol
    if attacked.actions.ndim == attacked.rewards.ndim:  # discrete: [.., T, N]
        act_diff = attacked.actions != clean.actions
    else:
        act_diff = jnp.max(jnp.abs(attacked.actions - clean.actions), axis=-1) > tol
    a, o = _first_true(act_diff, time_axis), _first_true(obs_diff, time_axis)
    return Divergence(action=a, obs=o, first=jnp.minimum(a, o))


# -------------------------------------------------------------------- protocol
class ProtocolChunk(NamedTuple):
    """One chunk of seeds of the attack protocol (S seeds, M attacked episodes each)."""

    seeds: np.ndarray  # int [S]
    clean: Episode  # [S]
    attacked: Episode  # [S, M]
    start_class: jax.Array  # int32 [S, M], index into START_MODES
    fell_back: jax.Array  # bool [S, M], onset chosen by the no-qualifying-step fallback


def make_protocol(
    env: MultiAgentEnv, team: Team, attack: Attack
) -> Callable[[Params, Params | None, jax.Array], ProtocolChunk]:
    """``protocol(actor_params, critic_params, seeds [S]) -> ProtocolChunk``, one jitted call.

    Per seed: the clean episode; the critic geometry (G, D) of that clean episode when an
    influence-based onset is asked for; then ``attacks.protocol_size`` attacked episodes
    (every selected ordered pair × every start class), all sharing the seed's key so they
    start from the clean episode's initial state.
    """
    spec = env.spec
    m = attacks.protocol_size(attack, spec.num_agents)
    uses_geometry = any(s != "uniform" for s in attack.start)
    rollout_one = _batched(partial(_episode, env, team, attack))

    def protocol(actor_params, critic_params, seeds):
        keys = seed_keys(seeds)
        s = keys.shape[0]
        clean = rollout_one(actor_params, critic_params, keys, attacks.clean_target((s,)))
        if uses_geometry:
            g, d = jax.vmap(attacks.influence_geometry, in_axes=(None, None, 0, 0))(
                team.critic_apply, critic_params, clean.obs_true, clean.critic_actions
            )
        else:
            g = d = None
        targets, cls, fell = jax.vmap(
            lambda k, length, gi, di: attacks.protocol_targets(
                attack, spec.num_agents, length, streams(k).protocol, gi, di
            )
        )(keys, episode_length(clean.done), g, d)
        attacked = rollout_one(
            actor_params, critic_params, jnp.repeat(keys[:, None], m, axis=1), targets
        )
        return clean, attacked, cls, fell

    jitted = float32_matmuls(jax.jit(protocol))  # onsets from the sign of D: full float32

    def run(actor_params, critic_params, seeds):
        check_params(attack, team, critic_params)
        if uses_geometry and (critic_params is None or team.critic_apply is None):
            raise ValueError(
                f"attack.start: {list(attack.start)} needs a Q critic for the influence "
                "geometry; none given (use start=uniform)"
            )
        seeds = np.asarray(seeds)
        return ProtocolChunk(seeds, *jitted(actor_params, critic_params, jnp.asarray(seeds)))

    return run


def iter_protocol(
    protocol: Callable[[Params, Params | None, jax.Array], ProtocolChunk],
    actor_params: Params,
    critic_params: Params | None,
    seeds: np.ndarray,
    chunk_size: int,
) -> Iterator[ProtocolChunk]:
    """Run the protocol over ``seeds`` in chunks of ``chunk_size`` (one compilation: the
    last chunk is padded with repeats of its last seed and trimmed)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size}")
    seeds = np.asarray(seeds)
    for lo in range(0, len(seeds), chunk_size):
        part = seeds[lo : lo + chunk_size]
        n = len(part)
        padded = np.concatenate([part, np.repeat(part[-1:], chunk_size - n)])
        out = protocol(actor_params, critic_params, padded)
        yield jax.tree_util.tree_map(lambda x, n=n: x[:n], out)


# -------------------------------------------------------------------- efficacy
def team_return(episodes: Episode) -> jax.Array:
    """Σ_t Σ_i r_i^t per episode [B..]."""
    return jnp.sum(episodes.rewards, axis=(-2, -1))


def action_changed(
    actions: np.ndarray,
    clean_actions: np.ndarray,
    victim: np.ndarray,
    active: np.ndarray,
    tol: float = 1e-5,
) -> np.ndarray:
    """Whether the victim's executed action differed from its policy's own greedy choice on
    the true observation (``clean_actions``, same state) at some step of the window.

    actions, clean_actions [B, T, N] (discrete) or [B, T, N, A] (continuous: differs when
    max |Δ| > tol); victim int [B]; active bool [B, T] (the window's played steps).
    Returns bool [B]. A fault that never changed what was executed (a sensor fault that
    left the argmax alone, a dropped no-op) cannot be found from the actions at all.
    """
    actions, clean_actions = np.asarray(actions), np.asarray(clean_actions)
    rows = np.arange(actions.shape[0])
    a, c = actions[rows, :, victim], clean_actions[rows, :, victim]  # [B, T(, A)]
    differs = a != c if a.ndim == 2 else np.max(np.abs(a - c), axis=-1) > tol
    return np.any(differs & np.asarray(active, bool), axis=1)


def efficacy_table(
    attack: Attack,
    clean_return: np.ndarray,
    attacked_return: np.ndarray,
    start_class: np.ndarray,
    victim: np.ndarray,
    observed: np.ndarray,
    changed: np.ndarray | None = None,
) -> pd.DataFrame:
    """Team return clean vs attacked, one row per start class of one attack.

    Inputs per seed [S] (clean_return) and per attacked episode [S, M] (the rest).
    drop = clean − attacked return of the same seed (positive = the attack hurt);
    drop_ci95 = 1.96 · its standard error (normal approximation over episodes).
    ``changed`` bool [S, M] (``action_changed``): ``action_changed`` is its share, with
    ``action_changed_ci95`` = 1.96 √(p(1 − p)/n); NaN when not given.
    ``high_beats_low`` (high_influence row only, when both classes were recorded): the share
    of (seed, pair) where the high-influence onset dropped the return more than the
    low-influence onset of the same pair — the paper's high- vs low-influence contrast.
    """
    clean_return = np.asarray(clean_return, np.float64)
    attacked_return = np.asarray(attacked_return, np.float64)
    start_class = np.asarray(start_class)
    drop = clean_return[:, None] - attacked_return
    clean_b = np.broadcast_to(clean_return[:, None], drop.shape)
    pairs = pd.DataFrame(
        {
            "seed": np.broadcast_to(np.arange(drop.shape[0])[:, None], drop.shape).ravel(),
            "victim": np.asarray(victim).ravel(),
            "observed": np.asarray(observed).ravel(),
            "start": start_class.ravel(),
            "drop": drop.ravel(),
        }
    ).pivot_table(index=["seed", "victim", "observed"], columns="start", values="drop")
    rows = []
    for c, mode in enumerate(START_MODES):
        sel = start_class == c
        n = int(sel.sum())
        if n == 0:
            continue
        d = drop[sel]
        row: dict[str, Any] = {
            "attack": attack.name,
            "magnitude": attack.magnitude,
            "start": mode,
            "episodes": n,
            "clean_return": clean_b[sel].mean(),
            "attacked_return": attacked_return[sel].mean(),
            "drop": d.mean(),
            "drop_se": d.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan,
            "share_hurt": float(np.mean(d > 0)),
            "high_beats_low": np.nan,
            "action_changed": np.nan,
            "action_changed_ci95": np.nan,
        }
        row["drop_ci95"] = 1.96 * row["drop_se"]
        if changed is not None:
            share = float(np.mean(np.asarray(changed)[sel]))
            row["action_changed"] = share
            row["action_changed_ci95"] = 1.96 * np.sqrt(share * (1 - share) / n)
        if mode == "high_influence":
            row["high_beats_low"] = _high_beats_low(pairs)
        rows.append(row)
    return pd.DataFrame(rows)


def _high_beats_low(pairs: pd.DataFrame) -> float:
    """Share of (seed, pair) rows with drop(high) > drop(low); NaN when no pair has both."""
    hi, lo = START_MODES.index("high_influence"), START_MODES.index("low_influence")
    if hi not in pairs.columns or lo not in pairs.columns:
        return np.nan
    both = pairs[[hi, lo]].dropna()
    return float(np.mean(both[hi] > both[lo])) if len(both) else np.nan
