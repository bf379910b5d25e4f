"""Orbax checkpoints of a training run: save, resume, and load a policy for evaluation.

A run directory holds ``checkpoints/<env_steps>/`` with three items:
  * ``state``  — the algorithm's whole TrainState (params, optimiser states, replay
    buffer, rng, counters), restored against ``jax.eval_shape(trainer.init, key)``;
  * ``policy`` — ``trainer.policy_params(state)`` (stacked actor/critic params), so that
    evaluation, attacks and forensics restore kilobytes instead of the replay buffer;
  * ``meta``   — JSON: resolved config, env spec, algo, env steps, chunk, code version.

Orbax writes each step into a temporary directory and renames it once every item is
complete, so a process killed mid-save (``kill -9``) leaves the previous checkpoint
intact and the half-written one invisible to ``latest_step``.

Orbax does not checksum what it wrote: a flipped bit in a parameter file restores silently.
So every save also records the sha256 of each item (``HASH_FILE``, via
``forensics.store.checkpoint_identity``, the same hash an episode store binds to), and every
load (``load_policy``, ``restore_train``) verifies the items it reads against it. A
checkpoint whose hashes differ, whose files are missing or that Orbax cannot read is
*damaged*: loading falls back to the newest intact older checkpoint with a warning naming
both, or fails with one ``CheckpointError`` line naming the directory. Checkpoints saved
before hashes were recorded load unverified, with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from configs.schema import ConfigError
from envs import EnvSpec, MultiAgentEnv, make_env
from forensics.store import (
    CheckpointError,
    StoreError,
    atomic_write,
    checkpoint_identity,
    current_code_version,
)

CHECKPOINT_DIR = "checkpoints"
# Config sections a checkpoint is bound to: resuming or evaluating under a different value
# of any of these would silently mix two experiments.
BOUND_SECTIONS = ("env", "algo", "seed")
ITEMS = ("state", "policy", "meta")
# sha256 of every item of a step, written once Orbax has committed the step. ``meta``
# records its name, so a checkpoint that should have one but lost it counts as damaged.
HASH_FILE = "content_sha256.json"
# where training moves a damaged checkpoint it resumed past (outside checkpoints/, which
# Orbax owns), so that the step can be saved again
DAMAGED_DIR = "damaged_checkpoints"


def make_meta(
    config: Mapping[str, Any], spec: EnvSpec, env_steps: int, chunk: int
) -> dict[str, Any]:
    """The JSON metadata stored with every checkpoint."""
    return {
        "config": dict(config),
        "env_spec": dataclasses.asdict(spec),
        "algo": config["algo"]["name"],
        "env_steps": env_steps,
        "chunk": chunk,
        "code_version": current_code_version(),
        "content_hashes": HASH_FILE,
    }


def manager(run_dir: str | Path, keep: int | None = None) -> ocp.CheckpointManager:
    """The run's checkpoint manager.

    A writer (``keep`` given) keeps the ``keep`` newest checkpoints and deletes
    half-written ones left by a killed process when it opens; a reader (``keep=None``)
    changes nothing, so evaluating while training runs is safe.
    """
    writer = keep is not None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=writer, cleanup_tmp_directories=writer
    )
    return ocp.CheckpointManager(Path(run_dir).resolve() / CHECKPOINT_DIR, options=options)


def save(
    mngr: ocp.CheckpointManager,
    state: Any,
    policy: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> None:
    """Checkpoint at step ``meta['env_steps']`` (returns once the write is committed)."""
    mngr.save(
        meta["env_steps"],
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            policy=ocp.args.StandardSave(policy),
            meta=ocp.args.JsonSave(dict(meta)),
        ),
    )
    mngr.wait_until_finished()
    step_dir = Path(mngr.directory) / str(meta["env_steps"])
    hashes = {item: checkpoint_identity(step_dir / item)["sha256"] for item in ITEMS}
    atomic_write(step_dir / HASH_FILE, json.dumps({"sha256": hashes}, indent=1) + "\n")


class Damaged(Exception):
    """One checkpoint step is damaged (internal: ``newest_intact`` falls back past it).
    ``uncommitted``: only its hash record is missing, as when the process was killed
    between Orbax's commit and the hash write (the hash file is the save's last step)."""

    def __init__(self, message: str, uncommitted: bool = False) -> None:
        super().__init__(message)
        self.uncommitted = uncommitted


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def verify_items(step_dir: Path, items: Sequence[str]) -> dict[str, dict[str, str]] | None:
    """Check ``items`` of one step against its recorded hashes; returns their identities
    (``checkpoint_identity``), or None for a checkpoint saved before hashes were recorded.
    Raises ``Damaged`` naming the first item that is missing or differs."""
    recorded_file = step_dir / HASH_FILE
    if not recorded_file.is_file():
        try:
            meta = json.loads((step_dir / "meta" / "metadata").read_text())
        except (OSError, ValueError) as err:
            raise Damaged(f"meta is unreadable ({_first_line(err)})") from None
        if meta.get("content_hashes"):
            raise Damaged(
                f"its save did not complete: no {HASH_FILE}, which its meta says was written",
                uncommitted=True,
            )
        return None
    try:
        recorded = json.loads(recorded_file.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise Damaged(f"{HASH_FILE} is unreadable ({_first_line(err)})") from None
    identities = {}
    for item in items:
        try:
            ident = checkpoint_identity(step_dir / item)
        except StoreError:
            raise Damaged(f"item {item}/ is missing or empty") from None
        if ident["sha256"] != recorded.get(item):
            raise Damaged(f"item {item}/ has sha256 {ident['sha256'][:12]}, {HASH_FILE} "
                          f"recorded {str(recorded.get(item))[:12]}")  # fmt: skip
        identities[item] = ident
    return identities


def newest_intact(
    mngr: ocp.CheckpointManager,
    items: Sequence[str],
    attempt: Callable[[int], Any],
    none_ok: bool = False,
) -> tuple[int | None, Any, dict[str, dict[str, str]] | None, list[tuple[int, str]]]:
    """(step, ``attempt(step)``, item identities, damaged newer steps) for the newest step
    whose ``items`` verify and that ``attempt`` restores.

    A step is skipped as damaged when its hashes differ or its files are missing
    (``verify_items``) or when Orbax fails to read it; falling back warns, naming the
    damaged checkpoint and the one used. ``ConfigError`` from ``attempt`` (a checkpoint of
    another config or layout: not damage) propagates at once. No intact step: one
    ``CheckpointError`` line, except that with ``none_ok`` a run whose only checkpoints are
    uncommitted saves (``Damaged.uncommitted``) gives ``(None, None, None, damaged)``: a
    training killed during its first save starts afresh, as if Orbax had not committed."""
    root = Path(mngr.directory)
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"{root}: no complete checkpoint")
    damaged: list[tuple[int, str]] = []
    uncommitted = 0
    for step in steps:
        try:
            identities = verify_items(root / str(step), items)
            try:
                result = attempt(step)
            except (ConfigError, CheckpointError):
                raise
            except Exception as err:  # noqa: BLE001 -- Orbax/TensorStore raise many types
                raise Damaged(f"Orbax cannot read it ({_first_line(err)})") from None
        except Damaged as err:
            damaged.append((step, str(err)))
            uncommitted += err.uncommitted
            continue
        if damaged:
            newest, why = damaged[0]
            warnings.warn(
                f"checkpoint {root / str(newest)} is damaged ({why}); using the newest intact "
                f"one, {root / str(step)}"
                + (f" ({len(damaged) - 1} more damaged)" if len(damaged) > 1 else ""),  # fmt: skip
                CheckpointWarning,
                stacklevel=3,
            )
        if identities is None:
            warnings.warn(
                f"checkpoint {root / str(step)}: saved before content hashes were recorded; "
                "loaded unverified",
                CheckpointWarning,
                stacklevel=3,
            )
        return step, result, identities, damaged
    newest, why = damaged[0]
    if none_ok and uncommitted == len(damaged):
        warnings.warn(
            f"checkpoint {root / str(newest)}: {why}; starting afresh", CheckpointWarning, 3
        )
        return None, None, None, damaged
    others = f"; the {len(damaged) - 1} older one(s) too" if len(damaged) > 1 else ""
    raise CheckpointError(f"checkpoint {root / str(newest)} is damaged: {why}{others}")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped, or one was loaded without hashes to verify."""


def move_damaged(run_dir: Path, damaged: Sequence[tuple[int, str]]) -> None:
    """Move damaged steps out of ``checkpoints/`` into ``DAMAGED_DIR/`` (kept for
    inspection): training resumed from an older step saves those steps again."""
    for step, _ in damaged:
        src = Path(run_dir).resolve() / CHECKPOINT_DIR / str(step)
        dst = Path(run_dir).resolve() / DAMAGED_DIR / str(step)
        dst.parent.mkdir(exist_ok=True)
        shutil.rmtree(dst, ignore_errors=True)
        src.rename(dst)


class Resumed(NamedTuple):
    """What ``restore_train`` found: step/state/meta None when nothing committed remains
    (start afresh); ``damaged``: the steps skipped, newest first (``move_damaged``)."""

    step: int | None
    state: Any
    meta: dict[str, Any] | None
    damaged: list[tuple[int, str]]


def latest_meta(mngr: ocp.CheckpointManager) -> dict[str, Any] | None:
    """Metadata of the newest intact checkpoint, or None if there is none."""
    if mngr.latest_step() is None:
        return None
    restore = lambda step: mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return newest_intact(mngr, ("meta",), restore)[1]["meta"]


def restore_state(
    mngr: ocp.CheckpointManager, abstract_state: Any, meta: Mapping[str, Any] | None = None
) -> Any:
    """The newest intact TrainState (``restore_train`` without a config to check)."""
    resumed = restore_train(mngr, abstract_state, None, str(mngr.directory))
    if resumed is None or resumed.state is None:
        raise CheckpointError(f"{mngr.directory}: no complete checkpoint")
    return resumed.state


def restore_train(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    config: Mapping[str, Any] | None,
    where: str,
) -> Resumed | None:
    """The newest intact checkpoint's TrainState (structure/shapes/dtypes of
    ``abstract_state``) and meta, after ``check_compatible`` with ``config`` (if given);
    None for a run without any.

    A train state saved by code whose state layout differs (e.g. a replay buffer without
    a field this version records) cannot resume: ``ConfigError`` names the checkpoint and
    the code version that wrote it. Its policy still loads (``load_policy``)."""
    if mngr.latest_step() is None:
        return None

    def attempt(step: int) -> tuple[Any, dict[str, Any]]:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if config is not None:
            check_compatible(meta, config, where)
        try:
            restored = mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except ValueError as err:
            # Orbax's ValueError on bytes whose hashes verified (or that predate hashes, as
            # before) is a tree of another layout, not damage
            version = meta.get("code_version", "an unknown code version")
            raise ConfigError(
                f"{mngr.directory}/{step}: the train state was saved by code {version} with "
                f"another layout ({str(err).splitlines()[0][:120]}); resume it with that "
                "version, or start a new run (another out_dir= or run_name=); its policy "
                "still evaluates and attacks"
            ) from None
        return restored["state"], meta

    step, restored, _, damaged = newest_intact(mngr, ITEMS, attempt, none_ok=True)
    state, meta = restored if restored is not None else (None, None)
    return Resumed(step, state, meta, damaged)


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: tree}


# Fields added to the bound sections after checkpoints were written without them, with the
# value that reproduces how those checkpoints were trained: such a checkpoint still matches
# a config that leaves the new field at that value (and resumes).
ADDED_FIELDS: dict[str, Any] = {
    "algo.auto_reset": False,
    "algo.entropy_coef": 0.0,
    "algo.kl_anneal_env_steps": 0,
    "algo.kl_threshold_final": 0.001,
    "algo.layer_norm": False,
    "algo.n_step": 1,
    "algo.policy_gradient": "decentralised",
    "algo.sharing": "none",
}


def check_compatible(meta: Mapping[str, Any], config: Mapping[str, Any], where: str) -> None:
    """Raise ``ConfigError`` naming the first env/algo/seed field that differs from ``meta``."""
    for section in BOUND_SECTIONS:
        saved = _flatten(meta["config"].get(section), section)
        given = _flatten(config.get(section), section)
        for field in sorted(saved.keys() | given.keys()):
            # A field the checkpoint predates was trained at its ADDED_FIELDS value.
            trained = saved[field] if field in saved else ADDED_FIELDS.get(field)
            if trained != given.get(field):
                raise ConfigError(
                    f"{field}: the checkpoint in {where} was trained with "
                    f"{field}={trained!r}, but the config has {field}={given.get(field)!r}"
                    " (use the original config, or another run_name/out_dir for a new run)"
                )


class Policy(NamedTuple):
    """What evaluation, attacks and forensics need from a trained run."""

    env: MultiAgentEnv
    params: Mapping[str, Any]  # trainer.policy_params(state): stacked actor/critic params
    config: dict[str, Any]  # the run's resolved config
    env_steps: int
    run_dir: Path
    # checkpoint_identity of the policy item: what episode stores bind to (None: not loaded
    # by load_policy)
    identity: dict[str, str] | None = None


def env_from_config(config: Mapping[str, Any]) -> MultiAgentEnv:
    return make_env(**config["env"])


def load_policy(run_dir: str | Path, config: Mapping[str, Any] | None = None) -> Policy:
    """Restore the newest checkpoint's policy params (not the train state) of a run.

    If ``config`` is given, it must agree with the checkpoint on env, algo and seed.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(f"{run_dir}: no {CHECKPOINT_DIR}/ here; is this a run directory?")
    mngr = manager(run_dir)
    restore = lambda step: mngr.restore(
        step,
        args=ocp.args.Composite(meta=ocp.args.JsonRestore(), policy=ocp.args.StandardRestore()),
    )
    step, restored, identities, _ = newest_intact(mngr, ("policy", "meta"), restore)
    meta = restored["meta"]
    identity = (
        identities["policy"]
        if identities
        else checkpoint_identity(run_dir / CHECKPOINT_DIR / str(step) / "policy")
    )
    if config is not None:
        check_compatible(meta, config, str(run_dir))
    env = env_from_config(meta["config"])
    saved_spec = EnvSpec(**meta["env_spec"])
    if env.spec != saved_spec:
        raise ConfigError(
            f"{run_dir}: env_spec: the checkpoint's {saved_spec} differs from what this code "
            f"builds for the same config, {env.spec}"
        )
    return Policy(env, restored["policy"], meta["config"], meta["env_steps"], run_dir, identity)


def policy_item(policy: Policy) -> Path:
    """The newest checkpoint's ``policy`` item of a loaded run: what an episode store's
    checkpoint hash identifies (acting needs only it, not the train state)."""
    path = policy.run_dir / CHECKPOINT_DIR / str(policy.env_steps) / "policy"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the policy item of the newest checkpoint is missing")
    return path.resolve()


def greedy_act_fn(policy: Policy) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
    """``(obs [N, O], avail [N, A] | None) -> env actions`` of the policy's deterministic
    (greedy) actors; ``avail`` masks illegal discrete actions."""
    algo = policy.config["algo"]
    if algo["name"] == "maddpg":
        from agents import maddpg

        actor, _ = maddpg.build_networks(policy.env.spec, maddpg.MaddpgConfig.from_mapping(algo))
        return functools.partial(maddpg.greedy_actions, actor, policy.params["actor"])
    if algo["name"] == "hatrpo":
        from agents import hatrpo

        cfg = hatrpo.HatrpoConfig.from_mapping(algo)
        return hatrpo.greedy_act_fn(policy.env.spec, cfg, policy.params)
    raise ConfigError(f"algo.name: no greedy policy for algorithm {algo['name']!r}")
