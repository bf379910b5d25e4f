"""Sharded and unsharded computations agree: the training loop with its parallel envs split
over devices, and a diagnose batch with its episodes split over devices.

JAX fixes its device count when it starts, so each check runs this file as a script in a
fresh process with 4 forced CPU host devices (``XLA_FLAGS``); the script writes both results
to an ``.npz`` and the test compares them here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

DEVICES = 4
FORCED = {
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
    "JAX_PLATFORMS": "cpu",
}
CHUNKS = 3  # maddpg_smoke: updates start in the first chunk (warmup 100 < 200 env steps)
TOL = {"rtol": 1e-5, "atol": 1e-6}  # only the summation order of reductions may differ


def run_check(name: str, out: Path) -> dict:
    """Run ``check_<name>`` in a 4-device process; its arrays and facts, loaded here."""
    env = {**os.environ, **FORCED}
    done = subprocess.run(
        [sys.executable, __file__, name, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as arrays:
        return {"arrays": dict(arrays), **json.loads(done.stdout.splitlines()[-1])}


def pairs(arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, sharded, unsharded) for every ``sharded/<name>`` with its ``single/<name>``."""
    names = sorted(k.removeprefix("sharded/") for k in arrays if k.startswith("sharded/"))
    assert names and all(f"single/{n}" in arrays for n in names)
    return [(n, arrays[f"sharded/{n}"], arrays[f"single/{n}"]) for n in names]


def test_training_chunks_agree_sharded_and_unsharded(tmp_path):
    result = run_check("train", tmp_path / "train.npz")
    assert result["visible_devices"] == DEVICES
    # the sharded trainer really split its 4 parallel envs over the 4 devices
    assert result["sharded_state_devices"] == DEVICES and result["single_state_devices"] == 1
    assert result["env_axis_split"] is True
    compared = pairs(result["arrays"])
    assert any(n.startswith("metrics/") for n, _, _ in compared)
    for name, sharded, single in compared:
        np.testing.assert_allclose(sharded, single, err_msg=name, **TOL)
    # losses are real numbers once updates started (the comparison is not of NaNs)
    assert np.isfinite(result["arrays"]["sharded/metrics/critic_loss"][-1])
    # a checkpoint of the sharded run restores onto one device with the same values
    assert result["restored_state_devices"] == 1 and result["restored_equal"] is True


def test_diagnose_measure_agrees_sharded_and_unsharded(tmp_path):
    result = run_check("measure", tmp_path / "measure.npz")
    assert result["measure_devices"] == DEVICES  # the episodes were split over 4 devices
    compared = pairs(result["arrays"])
    assert {"raw", "smooth", "q", "evidence", "valid"} <= {n for n, _, _ in compared}
    for name, sharded, single in compared:
        np.testing.assert_allclose(sharded, single, err_msg=name, **TOL)
    assert np.isfinite(result["arrays"]["sharded/raw"]).all()


# --------------------------------------------------------------- run in the 4-device process


def _leaves(prefix: str, tree) -> dict[str, np.ndarray]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(x) for path, x in flat}


def _devices(tree) -> int:
    import jax

    return max(len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(tree))


def check_train(out: str) -> dict:
    """``CHUNKS`` chunks of maddpg_smoke (4 parallel envs), over 4 devices and over one."""
    import tempfile

    import jax

    from agents import checkpoint, maddpg
    from cli.hydra_entry import compose_config

    config = compose_config(["algo=maddpg_smoke"])
    env = checkpoint.env_from_config(config)
    key = jax.random.PRNGKey(0)
    facts: dict = {"visible_devices": jax.device_count()}
    arrays: dict[str, np.ndarray] = {}
    states = {}
    for name, devices in (("sharded", None), ("single", jax.devices()[:1])):
        trainer = maddpg.make_trainer(env, config["algo"], devices=devices)
        state = trainer.init(key)
        if name == "sharded":
            # the env-axis constraint, as Shardy (or the older GSPMD) writes it
            hlo = trainer.train_chunk.lower(state).as_text()
            facts["env_axis_split"] = '[{"batch"}' in hlo or f"devices=[{DEVICES}," in hlo
        history = []
        for _ in range(CHUNKS):
            state, metrics = trainer.train_chunk(state)
            history.append(jax.device_get(metrics))
        facts[f"{name}_state_devices"] = _devices(state)
        arrays.update(
            {f"{name}/metrics/{k}": np.array([m[k] for m in history]) for k in history[0]}
        )
        arrays.update(_leaves(f"{name}/state", state))
        states[name] = (trainer, state)

    trainer, state = states["sharded"]
    with tempfile.TemporaryDirectory() as tmp:
        mngr = checkpoint.manager(tmp, keep=1)
        meta = checkpoint.make_meta(config, env.spec, 1, 1)
        checkpoint.save(mngr, state, trainer.policy_params(state), meta)
        single = states["single"][0]
        restored = checkpoint.restore_state(mngr, jax.eval_shape(single.init, key))
        mngr.close()
    facts["restored_state_devices"] = _devices(restored)
    facts["restored_equal"] = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state), strict=True
        )
    )
    np.savez(out, **arrays)
    return facts


def check_measure(out: str) -> dict:
    """A diagnose batch of 6 real greedy episodes (padded to 8) through ``_measure_batch``
    (split over 4 devices) against ``measure`` on one device."""
    import jax
    import jax.numpy as jnp

    from agents import checkpoint, maddpg
    from agents import rollout as R
    from agents.attacks import Attack, Team, clean_target
    from cli.hydra_entry import compose_config
    from forensics import diagnose
    from forensics.store import pad_batch

    config = compose_config(["algo=maddpg_smoke"])
    env = checkpoint.env_from_config(config)
    algo = maddpg.MaddpgConfig.from_mapping(config["algo"])
    learner = maddpg.init_learner(env.spec, algo, jax.random.PRNGKey(1))
    params = {"actor": learner.actor_params, "critic": learner.critic_params}
    policy = checkpoint.Policy(env, params, config, 0, Path("."))
    actor, critic = maddpg.build_networks(env.spec, algo)
    rollout = R.make_rollout(env, Team(env.spec, actor.apply, critic.apply), Attack("none"))
    episodes = 6
    ep = rollout(
        params["actor"],
        params["critic"],
        R.seed_keys(jnp.arange(episodes)),
        clean_target((episodes,)),
    )
    batch = {
        "episode_id": np.arange(episodes),
        "obs_perceived": np.asarray(ep.obs_perceived),
        "actions": np.asarray(ep.actions),
        "rewards": np.asarray(ep.rewards),
        "valid": np.ones(ep.rewards.shape[:2], bool),
    }
    cfg = diagnose.DiagnoseConfig.from_mapping({"batch_episodes": 8})
    model = diagnose.model_from_policy(policy, cfg.stage1)
    key = jax.random.PRNGKey(cfg.probe_seed)

    sharded, valid, n = diagnose._measure_batch(model, cfg, key, batch)
    padded = pad_batch(batch, cfg.batch_episodes)
    single = diagnose.measure(
        model.instruments,
        model.params,
        *(jnp.asarray(padded[k]) for k in ("obs_perceived", "actions", "rewards", "valid")),
        key,
        evidence_window=cfg.evidence_window,
        evidence=cfg.evidence,
    )
    arrays = {}
    for name, m, v in (("sharded", sharded, valid), ("single", single, padded["valid"])):
        fields = {k: getattr(m, k) for k in ("raw", "smooth", "q", "evidence", "finite")}
        arrays.update({f"{name}/{k}": np.asarray(x)[:n] for k, x in fields.items()})
        arrays.update(_leaves(f"{name}/geom", [np.asarray(x)[:n] for x in m.geom]))
        arrays[f"{name}/valid"] = np.asarray(v)[:n]
    np.savez(out, **arrays)
    return {"measure_devices": _devices(sharded.raw)}


if __name__ == "__main__":
    check, path = sys.argv[1], sys.argv[2]
    print(json.dumps({"train": check_train, "measure": check_measure}[check](path)))
