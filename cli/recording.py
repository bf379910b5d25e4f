"""Recording attacked episodes into an episode store: the work behind ``forensics rollout``.

For each seed s the recorder runs, in one jitted and vmapped call per chunk of seeds
(``agents.rollout.make_protocol``), the clean greedy episode and the attack's
``protocol_size`` attacked episodes (every selected ordered pair × onset class; the
worst-action default gives N(N−1)·2), all from the key PRNGKey(s). A seed's 1 + M episodes
get the ids s·(1 + M) + m (m = 0 clean, m ≥ 1 attacked, in protocol order), so ids are a
pure function of (seed, attack) and a chunk is committed to the store (``StoreWriter``)
only as whole seeds. Resuming is therefore exact: seeds already in the store are skipped,
the rest are chunked the same way, and nothing is duplicated.

One store holds one experiment: one checkpoint (the store checks its hash), one env (the
checkpoint's own), one attack config (checked here against the store's first session).

The efficacy table (``agents.rollout.efficacy_table``) is computed from the store itself,
streaming only the rewards column, so it covers every session and never needs the episodes
in memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from agents import attacks, checkpoint
from agents import rollout as R
from agents.attacks import START_MODES, Attack, Params, Team
from configs.schema import ConfigError, check_attack_fits, check_seed
from envs.base import MultiAgentEnv
from forensics import store as st

EFFICACY_FILE = "efficacy.parquet"
# The protocol's onset classes as the store names them (clean episodes are "none").
INFLUENCE = {"high_influence": "high", "low_influence": "low", "uniform": "uniform"}
# Config sections a rollout may override: the attack, and the checkpoint-bound sections
# only to restate (never to change) what the checkpoint was trained with.
ROLLOUT_SECTIONS = ("attack", *checkpoint.BOUND_SECTIONS)
DEFAULT_ATTACK = "worst_action"  # the paper's paired protocol, unless attack= says otherwise
# Session key naming the Python-stepped env a store's episodes were played in (absent:
# jitted episodes, replayable from their keys).
PLAYED_IN = "played_in"

ProtocolFn = Callable[[Params, Params | None, np.ndarray], R.ProtocolChunk]


# ------------------------------------------------------------------------ inputs
def parse_seeds(spec: str) -> np.ndarray:
    """Seeds from ``"A:B"`` (half-open, as in Python), ``"7"``, or a comma list of both
    (``"0:100,200:250"``); distinct, each in [0, 2³¹)."""
    expected = "expected START:STOP (half-open), an integer, or a comma list of them"
    seeds: list[int] = []
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition(":")
            seeds.extend(range(int(lo), int(hi)) if sep else [int(lo)])
    except ValueError:
        raise ConfigError(f"--seeds: {expected}, got {spec!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds: {spec!r} selects no seed; {expected}")
    arr = np.asarray(seeds, np.int64)
    check_seed(int(arr.min()), "--seeds")
    check_seed(int(arr.max()), "--seeds")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"--seeds: seed {uniq[counts > 1][0]} is selected twice in {spec!r}")
    return arr


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings → {"a.b.c": leaf}."""
    if isinstance(tree, Mapping):
        return {
            k: v
            for key, sub in tree.items()
            for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()
        }
    return {prefix: tree}


def overridden_fields(overrides: Sequence[str], composed: Mapping[str, Any]) -> list[str]:
    """Dotted fields of ``composed`` that ``overrides`` set; ConfigError for any section a
    rollout does not take. A group override (``env=simple_spread_5``) sets its whole section."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fields = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        section = key.split(".")[0].split("/")[0]
        if section not in ROLLOUT_SECTIONS:
            raise ConfigError(
                f"{override.input_line}: a rollout takes attack overrides (and "
                f"{'/'.join(checkpoint.BOUND_SECTIONS)} only to restate the checkpoint's), "
                f"not {section}"
            )
        fields.extend(_flat(composed[key], key) if "." not in key else [key])
    return fields


def rollout_config(
    overrides: Sequence[str], trained: Mapping[str, Any], run_dir: Path
) -> dict[str, Any]:
    """The checkpoint's resolved config with the attack section of ``overrides``
    (``attack=worst_action`` unless they pick another attack group).

    Env, algo and seed come from the checkpoint; an override of one of them must agree
    with it (a rollout of another env/algo is another checkpoint), else ConfigError.
    """
    from cli.hydra_entry import compose_config

    if not any(o.split("=")[0].lstrip("+~") == "attack" for o in overrides):
        overrides = [f"attack={DEFAULT_ATTACK}", *overrides]
    composed = compose_config(overrides)
    bound = lambda cfg: _flat({k: cfg.get(k) for k in checkpoint.BOUND_SECTIONS})
    flat_composed, flat_trained = bound(composed), bound(trained)
    for field in overridden_fields(overrides, composed):
        given, saved = flat_composed.get(field), flat_trained.get(field)
        if field.split(".")[0] != "attack" and given != saved:
            raise ConfigError(
                f"{field}={given!r}: the checkpoint in {run_dir} was trained with "
                f"{field}={saved!r}; a rollout uses the checkpoint's own "
                f"{field.split('.')[0]} (drop the override, or pass that run's directory)"
            )
    return {**{k: trained[k] for k in checkpoint.BOUND_SECTIONS}, "attack": composed["attack"]}


def team_of(policy: checkpoint.Policy) -> tuple[Team, Params, Params | None]:
    """(Team, stacked actor params, stacked critic params) of a loaded policy."""
    from agents.forensic_networks import forensic_networks

    nets = forensic_networks(policy)
    team = Team(policy.env.spec, nets.actor_apply, nets.critic_apply)
    return team, nets.actor_params, nets.critic_params


def policy_identity(policy: checkpoint.Policy) -> dict[str, str]:
    """The checkpoint identity a store is bound to: the hash of the restored policy item."""
    if policy.identity is not None:  # load_policy verified and hashed it
        return policy.identity
    return st.checkpoint_identity(checkpoint.policy_item(policy))


# ------------------------------------------------------------------------ protocol
def episodes_per_seed(attack: Attack, num_agents: int) -> int:
    """1 clean + M attacked episodes per seed (M = 0 for attack=none: clean episodes only)."""
    return 1 + (0 if attack.name == "none" else attacks.protocol_size(attack, num_agents))


def make_chunk_fn(env: MultiAgentEnv, team: Team, attack: Attack) -> ProtocolFn:
    """``fn(actor_params, critic_params, seeds [S]) -> ProtocolChunk``, one jitted call.

    The paired protocol of ``attack``; for ``attack=none`` the clean episodes alone (with an
    empty attacked axis, M = 0), since every "attacked" copy would equal the clean one.
    """
    if attack.name != "none":
        return R.make_protocol(env, team, attack)
    rollout = R.make_rollout(env, team, attack)

    def clean_only(actor_params, critic_params, seeds):
        seeds = np.asarray(seeds)
        keys = R.seed_keys(seeds)
        clean = rollout(actor_params, critic_params, keys, attacks.clean_target(seeds.shape))
        empty = lambda x: jnp.zeros((x.shape[0], 0, *x.shape[1:]), x.dtype)
        none = jnp.zeros((len(seeds), 0), jnp.int32)
        return R.ProtocolChunk(
            seeds, clean, jax.tree_util.tree_map(empty, clean), none, none.astype(bool)
        )

    return clean_only


def store_batch(chunk: R.ProtocolChunk, attack: Attack) -> dict[str, np.ndarray]:
    """The store rows of one chunk: per seed its clean episode then its M attacked ones.

    Ground truth of clean rows: attack "none", influence "none", victim/observed/start −1,
    window 0, magnitude 0. ``valid`` marks the steps up to and including the first done.
    """
    clean, attacked, cls = jax.device_get((chunk.clean, chunk.attacked, chunk.start_class))
    seeds = np.asarray(chunk.seeds, np.int64)
    s, m = cls.shape
    per_seed = m + 1
    join = lambda c, a: np.concatenate([c[:, None], a], axis=1).reshape(s * per_seed, *c.shape[1:])
    ep = jax.tree_util.tree_map(join, clean, attacked)
    is_clean = np.tile(np.arange(per_seed) == 0, s)
    unattacked = lambda x: np.where(is_clean, -1, x).astype(np.int32)
    influence = np.asarray([INFLUENCE[mode] for mode in START_MODES])
    cls = np.concatenate([np.zeros((s, 1), cls.dtype), cls], axis=1).ravel()
    done = np.asarray(ep.done)
    return {
        "obs_true": ep.obs_true,
        "obs_perceived": ep.obs_perceived,
        "actions": ep.actions,
        "clean_actions": ep.clean_actions,
        "rewards": ep.rewards,
        "avail": ep.avail,
        "valid": np.cumsum(done, axis=-1) - done == 0,
        "episode_id": (seeds[:, None] * per_seed + np.arange(per_seed)).ravel(),
        "seed": np.repeat(seeds, per_seed),
        "replay_key": ep.key,
        "clean": is_clean,
        "attack": np.where(is_clean, "none", attack.name),
        "victim": unattacked(ep.target.victim),
        "observed": unattacked(ep.target.observed),
        "start": unattacked(ep.target.start),
        "window": np.where(is_clean, 0, ep.target.window).astype(np.int32),
        "magnitude": np.where(is_clean, 0.0, attack.magnitude).astype(np.float32),
        "influence": np.where(is_clean, "none", influence[cls]),
    }


# ------------------------------------------------------------------------ the store
def committed_seeds(
    out: Path, attack_cfg: Mapping[str, Any], played_in: str | None = None
) -> set[int]:
    """Seeds already in the store at ``out`` (none if it does not exist yet).

    A store holds one attack, and episodes of one kind: jitted, replayable ones
    (``played_in`` None) or ones played in a Python-stepped env (``played_in`` its name,
    e.g. the real game). A store recorded with another attack config or another kind is
    refused (StoreError, nothing written).
    """
    if not (out / "meta.json").is_file():
        return set()
    store = st.open_store(out)
    had = store.meta.config.get("rollout", {}).get(PLAYED_IN)
    if store.meta.sessions and had != played_in:
        kind = lambda name: f"played in {name}" if name else "jitted (replayable)"
        raise st.StoreError(
            f"store {out}: holds episodes {kind(had)}, this command records episodes "
            f"{kind(played_in)}; refusing to append (nothing written; use another --out)"
        )
    recorded = store.meta.config.get("attack")
    if recorded is not None and dict(recorded) != dict(attack_cfg):
        keys = ["name", *sorted((set(recorded) | set(attack_cfg)) - {"name"})]
        k = next(k for k in keys if recorded.get(k) != attack_cfg.get(k))
        shown = lambda cfg: f"attack.{k}={cfg[k]!r}" if k in cfg else f"no attack.{k}"
        raise st.StoreError(
            f"store {out}: recorded with {shown(recorded)}, this command has "
            f"{shown(attack_cfg)}; refusing to append (nothing written; use another --out)"
        )
    return set(store.ground_truth()["seed"].tolist())


class Recorded(NamedTuple):
    """What one ``record`` call did."""

    seeds_skipped: int  # already in the store
    seeds_recorded: int
    episodes: int  # written by this call
    fell_back: int  # influence onsets chosen by the no-qualifying-step fallback
    compute_s: float  # rollouts (the first chunk includes compilation)
    write_s: float  # validation, encoding and durable commits
    late_onsets: int  # attacked episodes that ended before their onset (stepped envs only)


def record(
    out: Path,
    policy: checkpoint.Policy,
    config: Mapping[str, Any],
    seeds: np.ndarray,
    chunk_seeds: int,
    on_chunk: Callable[[int], None] | None = None,
    session: Mapping[str, Any] | None = None,
    stepped_env: Any | None = None,
) -> Recorded:
    """Record ``seeds`` of ``config['attack']`` into the store at ``out`` (resuming it).

    ``on_chunk(n)`` reports progress: n more of the requested episodes are in the store
    (once up front for seeds already recorded, then after every committed chunk).
    ``session`` is recorded in the store session's config under ``rollout``.

    ``stepped_env``: play in this env stepped from Python (the real game, with the
    checkpoint env's shapes) instead of the checkpoint's jitted env, one seed per chunk
    (``make_stepped_seed_fn``). The store is the same (columns, ids, ground truth,
    checkpoint identity, the checkpoint env's spec), so ``diagnose`` reads it as is; its
    sessions record ``rollout.played_in`` = the env's name and ``replayable`` false.
    """
    attack = Attack.from_config(config["attack"])
    spec = policy.env.spec
    check_attack_fits(attack, spec)
    per_seed = episodes_per_seed(attack, spec.num_agents)
    team, actor_params, critic_params = team_of(policy)
    identity = policy_identity(policy)
    rollout = dict(session or {})
    if stepped_env is not None:
        check_stepped_env(stepped_env, spec, policy.run_dir)
        rollout.update({PLAYED_IN: stepped_env.spec.name, "replayable": False})
    done = committed_seeds(out, config["attack"], rollout.get(PLAYED_IN))
    todo = np.asarray([s for s in seeds.tolist() if s not in done], np.int64)
    session_config = {**config, "rollout": rollout}
    if stepped_env is None:
        fn = make_chunk_fn(policy.env, team, attack)
        chunks = R.iter_protocol(fn, actor_params, critic_params, todo, chunk_seeds)
    else:
        one_seed = make_stepped_seed_fn(stepped_env, team, attack)
        chunks = (one_seed(actor_params, critic_params, s) for s in todo.tolist())
    report = on_chunk or (lambda n: None)
    report((len(seeds) - len(todo)) * per_seed)
    fell = late = 0
    compute = write = 0.0
    with st.StoreWriter(
        out, spec, checkpoint=identity, config=session_config, seeds=todo, optional_fields=["avail"]
    ) as w:
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            if chunk is None:
                break
            jax.block_until_ready(chunk)
            t1 = time.perf_counter()
            w.append(store_batch(chunk, attack))
            compute, write = compute + t1 - t0, write + time.perf_counter() - t1
            fell += int(np.sum(chunk.fell_back))
            played = R.episode_length(jnp.asarray(chunk.attacked.done))
            late += int(np.sum(np.asarray(chunk.attacked.target.start) >= np.asarray(played)))
            report(len(chunk.seeds) * per_seed)
    recorded = len(seeds) - len(todo), len(todo), len(todo) * per_seed
    return Recorded(*recorded, fell, compute, write, late)


# ------------------------------------------------------------------------ efficacy
def team_returns(store: st.EpisodeStore) -> pd.DataFrame:
    """Ground truth of every episode plus its team return Σ_t Σ_i r_i^t (valid steps),
    sorted by (seed, episode id); only the rewards/valid columns are streamed."""
    ids, returns = [], []
    for b in store.iter_batches(["episode_id", "rewards", "valid"], 4096):
        ids.append(b["episode_id"])
        returns.append(np.sum(b["rewards"] * b["valid"][..., None], axis=(1, 2)))
    gt = store.ground_truth()
    by_id = pd.Series(
        np.concatenate(returns) if returns else [],
        dtype=np.float64,
        index=np.concatenate(ids) if ids else [],
    )
    gt["team_return"] = by_id.reindex(gt["episode_id"]).to_numpy()
    return gt.sort_values(["seed", "episode_id"], ignore_index=True)


def victim_changed(store: st.EpisodeStore) -> pd.Series:
    """Per attacked episode id: did the victim's executed action differ from its policy's
    greedy choice inside the window (``agents.rollout.action_changed``; window = the played
    steps start ≤ t < start + window). Streams the action columns only."""
    gt = store.ground_truth().set_index("episode_id")
    ids, flags = [], []
    for b in store.iter_batches(["episode_id", "actions", "clean_actions", "valid"], 4096):
        rows = gt.loc[b["episode_id"]]
        keep = ~rows["clean"].to_numpy()
        if not keep.any():
            continue
        start = rows["start"].to_numpy()[keep, None]
        t = np.arange(b["valid"].shape[1])[None]
        active = (t >= start) & (t < start + rows["window"].to_numpy()[keep, None])
        active &= b["valid"][keep]
        victim = rows["victim"].to_numpy()[keep]
        pick = lambda x, keep=keep: x[keep]
        changed = R.action_changed(pick(b["actions"]), pick(b["clean_actions"]), victim, active)
        ids.append(b["episode_id"][keep])
        flags.append(changed)
    if not ids:
        return pd.Series([], dtype=bool)
    return pd.Series(np.concatenate(flags), index=np.concatenate(ids))


def efficacy(store: st.EpisodeStore, attack: Attack) -> pd.DataFrame:
    """``agents.rollout.efficacy_table`` over the whole store (empty for clean-only stores),
    with the share of episodes whose victim's executed action changed in the window."""
    gt = team_returns(store)
    clean, hit = gt[gt["clean"]], gt[~gt["clean"]]
    s = len(clean)
    m = len(hit) // max(s, 1)
    counts = hit.groupby("seed").size().reindex(clean["seed"], fill_value=0)
    if len(hit) != s * m or (counts != m).any():
        raise st.StoreError(
            f"store {store.path}: seeds have unequal numbers of attacked episodes; "
            "expected a store written by `forensics rollout`"
        )
    cls = {INFLUENCE[mode]: c for c, mode in enumerate(START_MODES)}
    grid = lambda col: hit[col].to_numpy().reshape(s, m)
    changed = victim_changed(store).reindex(hit["episode_id"]).to_numpy() if m else None
    return R.efficacy_table(
        attack,
        clean["team_return"].to_numpy(),
        grid("team_return"),
        hit["influence"].map(cls).to_numpy().reshape(s, m),
        grid("victim"),
        grid("observed"),
        None if changed is None else changed.astype(bool).reshape(s, m),
    )


def save_efficacy(store: st.EpisodeStore, table: pd.DataFrame) -> Path:
    """Write ``table`` atomically to ``<store>/efficacy.parquet`` with the store's identity."""
    return st.write_table(
        table,
        store.path / EFFICACY_FILE,
        metadata={
            "store": str(store.path.resolve()),
            "checkpoint": store.meta.checkpoint,
            "episodes": store.n_episodes,
            "attack": store.meta.config.get("attack"),
        },
    )


# ------------------------------------------------------------- Python-stepped envs
def stepped_attack_config(attack_cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """The attack section for an env that cannot be replayed (the real game): onsets
    ``uniform`` (high/low influence need the critic geometry of a replayed clean episode).
    An explicit ``attack.start`` other than uniform is a ConfigError."""
    cfg = dict(attack_cfg)
    if cfg.get("name") == "none":
        return cfg
    given = [o for o in overrides if o.split("=")[0].lstrip("+~") == "attack.start"]
    if given and list(np.atleast_1d(cfg["start"])) != ["uniform"]:
        raise ConfigError(
            f"{given[-1]}: an env stepped from Python cannot replay the clean episode that "
            "high/low-influence onsets are read from; use attack.start=uniform (the default here)"
        )
    return {**cfg, "start": ["uniform"]}


def check_stepped_env(env: Any, spec: Any, run_dir: Path) -> None:
    """The env has the checkpoint env's shapes (every ``EnvSpec`` field but the name)."""
    for key, value in dataclasses.asdict(spec).items():
        got = getattr(env.spec, key)
        if key != "name" and got != value:
            raise ConfigError(
                f"env {env.spec.name}: {key} is {got!r}, the checkpoint in {run_dir} "
                f"({spec.name}) has {value!r}"
            )


def make_stepped_seed_fn(
    env: Any, team: Team, attack: Attack
) -> Callable[[Params, Params | None, int], R.ProtocolChunk]:
    """``fn(actor_params, critic_params, seed) -> ProtocolChunk`` of one seed (S = 1) played
    in a Python-stepped env (``agents.rollout.make_player``).

    The seed's clean episode is played first, from key k = PRNGKey(seed); the attack's
    protocol targets (``attacks.protocol_targets`` with uniform onsets, drawn from k's
    protocol stream) take their onsets from [0, L − window], L the clean episode's played
    length, as ``forensics rollout`` does. Attacked episode m (1-based) is played from
    its own key fold_in(k, m): a game is not replayed by its key, so no attacked episode
    shares a replay key with the clean one, and nothing pairs them as counterfactuals
    (``forensics evaluate`` reports those columns as missing).
    """
    spec = env.spec
    play = R.make_player(env, team, attack)
    targets_of = jax.jit(
        lambda length, key: attacks.protocol_targets(
            attack, spec.num_agents, length, R.streams(key).protocol, None, None
        )
    )
    stack = lambda eps: jax.tree_util.tree_map(lambda *xs: np.stack(xs), *eps)

    def one_seed(actor_params, critic_params, seed):
        key = R.seed_keys(np.asarray([seed]))[0]
        clean = play(actor_params, critic_params, key, attacks.clean_target())
        if attack.name == "none":
            empty = jax.tree_util.tree_map(
                lambda x: np.zeros((1, 0, *np.shape(x)), np.asarray(x).dtype), clean
            )
            none = np.zeros((1, 0), np.int32)
            return R.ProtocolChunk(np.asarray([seed]), stack([clean]), empty, none, none > 0)
        targets, cls, fell = targets_of(R.episode_length(jnp.asarray(clean.done)), key)
        attacked = [
            play(
                actor_params,
                critic_params,
                jax.random.fold_in(key, m + 1),
                jax.tree_util.tree_map(lambda x, m=m: x[m], targets),
            )
            for m in range(len(cls))
        ]
        return R.ProtocolChunk(
            np.asarray([seed]), stack([clean]), stack([stack(attacked)]), cls[None], fell[None]
        )

    return one_seed
