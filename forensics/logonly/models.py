"""The log-only reference models, fitted on clean episodes of their own seeds, and their identity.

What is fitted, and why that kind of model:

* cross-agent predictors f_ij (o_i^t from [o_j^t, o_j^{t−1}, a_i^{t−1}], every ordered pair) and
  own-dynamics predictors g_i (o_i^t from [o_i^{t−1}, a_i^{t−1}]) — **ridge regression**. On
  Simple Spread every feature of o_i is a linear function of those inputs away from contacts
  (relative positions are differences of positions; p' = p + dt·v, v' = (1 − d)·v + dt·f(a)),
  so a linear least-squares fit recovers the relation in closed form, in milliseconds, with no
  optimiser to tune; the clean residual left over (contacts, float rounding) is measured on
  held-out episodes and becomes the per-feature scale σ (floored at ``sigma_floor``, well above
  float32-vs-float64 path differences, so a rounding-level residual never counts as evidence).
  Features are standardised before the ridge penalty λ so λ means the same for every feature.
* the teammate behaviour model p̂_i(a | o_{−i}) (Kazari et al.) — a **small Flax MLP** trained
  with Optax (cross-entropy): the map from teammates' views to a greedy policy's action is a
  piecewise-constant classifier, which no linear model fits.
* CUSUM reference values κ_{k,i}: the ``cusum_quantile`` of each instrument's clean per-step
  score on the held-out episodes.

Fit quality on the held-out episodes (the last ``holdout`` share of the clean store): R² per
ridge target (mean over features that vary), the teammate model's NLL and accuracy.

Identity: the saved models record the checkpoint (path + sha256) of the policy that recorded
the clean store, the env spec, the store schema (version + the observation/action columns)
and the fit data (the store's committed chunk hashes and seeds). ``check_models`` refuses a
model used with another checkpoint, env or schema in one line naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from forensics.logonly import instruments as I
from forensics.store import EpisodeStore, StoreError, atomic_write, current_code_version

FORMAT = "marl-forensics/logonly-models"
VERSION = 1
META_FILE, PARAMS_FILE = "meta.json", "params.msgpack"
FIT_FIELDS = ("episode_id", "seed", "valid", "obs_perceived", "actions")
SCHEMA_COLUMNS = ("obs_perceived", "actions")  # the columns the models read


@dataclass(frozen=True)
class FitConfig:
    """``forensics fit-models`` settings (``fit.<field>=<value>``)."""

    holdout: float = 0.2  # share of the clean episodes held out for σ, κ and the fit quality
    ridge_lambda: float = 1e-6  # λ on standardised features (a tiny stabiliser, not a prior)
    sigma_floor: float = 1e-3  # residual scale floor (obs units; float-path noise is ~1e-5)
    cusum_quantile: float = 0.9  # κ: the clean per-step quantile a deviation must exceed
    teammate_hidden: tuple[int, ...] = (64, 64)
    teammate_epochs: int = 40
    teammate_batch: int = 512
    teammate_lr: float = 3e-3
    seed: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> FitConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in cfg:
            if key not in names:
                raise ValueError(f"fit.{key}: unknown; expected one of {', '.join(sorted(names))}")
        d = dict(cfg)
        if "teammate_hidden" in d:
            d["teammate_hidden"] = tuple(d["teammate_hidden"])
        out = cls(**d)
        out.check()
        return out

    def check(self) -> None:
        rules = [
            ("holdout", 0 < self.holdout < 1, "in (0, 1)"),
            ("ridge_lambda", self.ridge_lambda >= 0, ">= 0"),
            ("sigma_floor", self.sigma_floor > 0, "> 0"),
            ("cusum_quantile", 0 < self.cusum_quantile < 1, "in (0, 1)"),
            ("teammate_epochs", self.teammate_epochs >= 1, ">= 1"),
            ("teammate_batch", self.teammate_batch >= 1, ">= 1"),
            ("teammate_lr", self.teammate_lr > 0, "> 0"),
        ]
        for name, ok, expected in rules:
            if not ok:
                raise ValueError(f"fit.{name}: expected {expected}, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------- ridge


def ridge(x: jax.Array, y: jax.Array, w: jax.Array, lam: float) -> tuple[jax.Array, jax.Array]:
    """Weighted ridge: (W, b) minimising Σ_s w_s ‖y_s − W x_s − b‖² + λ (Σ w) ‖W̃‖², W̃ the
    weights on the standardised features x̃ = (x − x̄)/s_x (constant features: s_x = 1).
    x [S, D], y [S, O], w [S] → W [D, O], b [O] on the raw scale."""
    sw = jnp.maximum(jnp.sum(w), 1.0)
    mx = jnp.sum(w[:, None] * x, 0) / sw
    sx = jnp.sqrt(jnp.sum(w[:, None] * (x - mx) ** 2, 0) / sw)
    sx = jnp.where(sx > 1e-8, sx, 1.0)
    my = jnp.sum(w[:, None] * y, 0) / sw
    xs = (x - mx) / sx * jnp.sqrt(w)[:, None]
    ys = (y - my) * jnp.sqrt(w)[:, None]
    gram = xs.T @ xs + lam * sw * jnp.eye(x.shape[1])
    ws = jnp.linalg.solve(gram, xs.T @ ys)
    wt = ws / sx[:, None]
    return wt, my - mx @ wt


def residual_scale(r: jax.Array, w: jax.Array, floor: float) -> jax.Array:
    """σ_f = max(√(Σ w r_f² / Σ w), floor) over the leading sample axis of r [S, ..., O]."""
    ww = w.reshape(w.shape + (1,) * (r.ndim - 1))
    return jnp.maximum(jnp.sqrt(jnp.sum(ww * r**2, 0) / jnp.maximum(jnp.sum(w), 1.0)), floor)


def r_squared(y: jax.Array, pred: jax.Array, w: jax.Array) -> jax.Array:
    """Mean over the target features that vary of R²_f = 1 − SSE_f/SST_f (leading axis S)."""
    ww = w.reshape(w.shape + (1,) * (y.ndim - 1))
    sw = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(ww * y, 0) / sw
    sst = jnp.sum(ww * (y - mean) ** 2, 0)
    sse = jnp.sum(ww * (y - pred) ** 2, 0)
    varies = sst > 1e-9 * sw
    r2 = jnp.where(varies, 1.0 - sse / jnp.where(varies, sst, 1.0), 0.0)
    return jnp.sum(r2, -1) / jnp.maximum(jnp.sum(varies, -1), 1)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])


def fit_cross(obs, prev_act, valid, lam: float) -> dict[str, jax.Array]:
    """Ridge f_ij for every ordered pair; diagonal entries are fitted too but never read."""
    x = _flat(I.cross_inputs(obs, prev_act))  # [S, N, N, D]
    n = obs.shape[2]
    y = _flat(jnp.broadcast_to(obs[:, :, :, None], (*obs.shape[:3], n, obs.shape[-1])))
    w = _flat(valid.astype(jnp.float32))
    fit = jax.vmap(jax.vmap(ridge, in_axes=(1, 1, None, None)), in_axes=(1, 1, None, None))
    wt, b = fit(x, y, w, lam)
    return {"cross_w": wt, "cross_b": b}


def fit_dynamics(obs, prev_act, valid, lam: float) -> dict[str, jax.Array]:
    """Ridge g_i per agent on the steps t ≥ 1 (t = 0 has no past)."""
    x = _flat(I.dynamics_inputs(obs, prev_act))  # [S, N, D]
    y = _flat(obs)
    w = _flat((valid & (jnp.arange(obs.shape[1]) >= 1)[None]).astype(jnp.float32))
    wt, b = jax.vmap(ridge, in_axes=(1, 1, None, None))(x, y, w, lam)
    return {"dyn_w": wt, "dyn_b": b}


def cross_residual(m, obs, prev_act):
    x = I.cross_inputs(obs, prev_act)
    pred = jnp.einsum("btijd,ijdo->btijo", x, m["cross_w"]) + m["cross_b"]
    return obs[:, :, :, None], pred


def dynamics_residual(m, obs, prev_act):
    pred = jnp.einsum("btid,ido->btio", I.dynamics_inputs(obs, prev_act), m["dyn_w"]) + m["dyn_b"]
    return obs, pred


# --------------------------------------------------------------------------- teammate


def fit_teammate(
    x: jax.Array, y: jax.Array, w: jax.Array, cfg: FitConfig, action_dim: int, key: jax.Array
) -> tuple[Any, jax.Array]:
    """Adam on the weighted cross-entropy −Σ w log p̂_i(y | x) of every agent's own MLP.
    x [S, N, D], y [S, N] int, w [S]; returns (stacked params, per-epoch mean loss)."""
    net = I.Teammate(cfg.teammate_hidden, action_dim)
    n = x.shape[1]
    k_init, k_fit = jax.random.split(key)
    params = jax.vmap(lambda k: net.init(k, x[0, 0]))(jax.random.split(k_init, n))
    size = x.shape[0]
    batch = min(cfg.teammate_batch, size)
    per_epoch = size // batch
    tx = optax.adam(cfg.teammate_lr)

    def loss_fn(p, xb, yb, wb):
        logits = jax.vmap(net.apply, in_axes=(0, 1), out_axes=1)(p, xb)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[..., None], -1)[..., 0]
        return jnp.sum(wb[:, None] * nll) / (n * jnp.maximum(jnp.sum(wb), 1.0))

    @jax.jit
    def run(params, key):
        def minibatch(carry, idx):
            p, opt = carry
            loss, g = jax.value_and_grad(loss_fn)(p, x[idx], y[idx], w[idx])
            upd, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, upd), opt), loss

        def epoch(carry, k):
            perm = jax.random.permutation(k, size)[: per_epoch * batch]
            carry, losses = jax.lax.scan(minibatch, carry, perm.reshape(per_epoch, batch))
            return carry, jnp.mean(losses)

        (p, _), losses = jax.lax.scan(
            epoch, (params, tx.init(params)), jax.random.split(key, cfg.teammate_epochs)
        )
        return p, losses

    return run(params, k_fit)


# --------------------------------------------------------------------------- identity


def store_schema(store: EpisodeStore) -> dict[str, Any]:
    """The schema facts the models depend on: version and the columns they read."""
    cols = {c.name: c.to_json() for c in store.meta.columns if c.name in SCHEMA_COLUMNS}
    return {"schema_version": store.meta.schema_version, "columns": cols}


def data_identity(store: EpisodeStore, seeds: np.ndarray) -> dict[str, Any]:
    """sha256 over the committed chunks' own hashes: which episodes the models were fitted on."""
    h = hashlib.sha256(json.dumps([[c.file, c.sha256] for c in store.chunks]).encode())
    return {
        "store": str(store.path.resolve()),
        "sha256": h.hexdigest(),
        "episodes": int(len(seeds)),
        "seed_min": int(seeds.min()),
        "seed_max": int(seeds.max()),
    }


def check_models(
    meta: Mapping[str, Any], where: Path, checkpoint: Mapping[str, str], env: Mapping, store
) -> None:
    """Refuse models fitted on another checkpoint, env or store schema (one line, both named)."""
    have = meta["checkpoint"]
    if have["sha256"] != checkpoint["sha256"]:
        raise StoreError(
            f"models {where}: fitted on checkpoint {have['path']} (sha256 {have['sha256'][:12]}), "
            f"not on {checkpoint['path']} (sha256 {checkpoint['sha256'][:12]}); refit with "
            "`forensics fit-models`"
        )
    for key, value in env.items():
        if meta["env"].get(key) != value:
            raise StoreError(
                f"models {where}: fitted on env {key} = {meta['env'].get(key)!r}, not on "
                f"{value!r} (store {store.path})"
            )
    schema = store_schema(store)
    if meta["store_schema"] != schema:
        raise StoreError(
            f"models {where}: fitted on store schema {json.dumps(meta['store_schema'])}, not on "
            f"{json.dumps(schema)} (store {store.path})"
        )


# --------------------------------------------------------------------------- fit


def _split(arrays: Mapping[str, np.ndarray], holdout: float):
    n = len(arrays["episode_id"])
    n_hold = max(1, int(round(holdout * n)))
    if n - n_hold < 2:
        raise StoreError(f"fit store: {n} clean episodes; need at least {n_hold + 2}")
    fit = {k: jnp.asarray(v[: n - n_hold]) for k, v in arrays.items()}
    hold = {k: jnp.asarray(v[n - n_hold :]) for k, v in arrays.items()}
    return fit, hold


def fit_models(
    clean: Mapping[str, np.ndarray], st: I.Statics, actor_params: Any, cfg: FitConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit every model on the clean episodes ``clean`` (the store's arrays, ``FIT_FIELDS``);
    returns (models pytree, report). ``st.instruments`` says which ones to fit."""
    t0 = time.perf_counter()
    fit, hold = _split(clean, cfg.holdout)
    n = fit["obs_perceived"].shape[2]
    report: dict[str, Any] = {
        "fit_episodes": int(fit["valid"].shape[0]),
        "holdout_episodes": int(hold["valid"].shape[0]),
    }
    pa = {d: I.previous_action(a["actions"], st.discrete, st.action_dim) for d, a in (
        ("fit", fit), ("hold", hold))}  # fmt: skip
    models: dict[str, Any] = {}
    hw = hold["valid"].astype(jnp.float32)
    if "crossagent" in st.instruments:
        models.update(fit_cross(fit["obs_perceived"], pa["fit"], fit["valid"], cfg.ridge_lambda))
        y, pred = cross_residual(models, hold["obs_perceived"], pa["hold"])
        y = jnp.broadcast_to(y, pred.shape)
        r, w = _flat(y - pred), _flat(hw)
        models["cross_sigma"] = residual_scale(r, w, cfg.sigma_floor)
        r2 = np.asarray(r_squared(_flat(y), _flat(pred), w))
        off = ~np.eye(n, dtype=bool)
        report["crossagent_holdout_r2"] = {"median": float(np.median(r2[off])),
                                           "min": float(r2[off].min())}  # fmt: skip
    if "dynamics" in st.instruments:
        models.update(fit_dynamics(fit["obs_perceived"], pa["fit"], fit["valid"], cfg.ridge_lambda))
        y, pred = dynamics_residual(models, hold["obs_perceived"], pa["hold"])
        w = _flat(hw * (jnp.arange(y.shape[1]) >= 1)[None])
        models["dyn_sigma"] = residual_scale(_flat(y - pred), w, cfg.sigma_floor)
        r2 = np.asarray(r_squared(_flat(y), _flat(pred), w))
        report["dynamics_holdout_r2"] = {"median": float(np.median(r2)), "min": float(r2.min())}
    if "teammate" in st.instruments:
        x = _flat(I.teammate_inputs(fit["obs_perceived"]))
        params, losses = fit_teammate(
            x,
            _flat(fit["actions"]),
            _flat(fit["valid"].astype(jnp.float32)),
            cfg,
            st.action_dim,
            jax.random.PRNGKey(cfg.seed),
        )
        models["teammate"] = params
        nll = I.teammate_score(st, params, hold["obs_perceived"], hold["actions"])
        net = I.Teammate(cfg.teammate_hidden, st.action_dim)
        logits = jax.vmap(net.apply, in_axes=(0, 2), out_axes=2)(
            params, I.teammate_inputs(hold["obs_perceived"])
        )
        acc = jnp.argmax(logits, -1) == hold["actions"]
        v = hold["valid"][..., None]
        report["teammate_train_nll"] = float(losses[-1])
        report["teammate_holdout_nll"] = float(jnp.sum(nll * v) / jnp.sum(v * jnp.ones_like(nll)))
        report["teammate_holdout_accuracy"] = float(
            jnp.sum(acc * v) / jnp.sum(v * jnp.ones_like(nll))
        )
    # κ from the held-out clean per-step scores of every fitted instrument
    scores = I.step_scores(
        st, actor_params, models, hold["obs_perceived"], hold["actions"], hold["valid"]
    )
    models["kappa"] = {}
    for name, s in scores.items():
        valid = hold["valid"] & (
            (jnp.arange(s.shape[1]) >= 1)[None] if name == "dynamics" else True
        )
        flat = jnp.where(valid[..., None], s, jnp.nan).reshape(-1, n)
        models["kappa"][name] = jnp.nanquantile(flat, cfg.cusum_quantile, axis=0)
    models = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), models)
    report["kappa"] = {k: [float(x) for x in v] for k, v in models["kappa"].items()}
    report["fit_seconds"] = time.perf_counter() - t0
    return models, report


# --------------------------------------------------------------------------- save / load


def save(out: Path, models: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write ``out/params.msgpack`` and ``out/meta.json`` (each atomically; meta last, so a
    directory with a meta always has its params)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PARAMS_FILE, serialization.msgpack_serialize(dict(models)))
    atomic_write(out / META_FILE, json.dumps(dict(meta), indent=1) + "\n")
    return out


def load(where: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(models pytree, meta) of a ``forensics fit-models`` output directory."""
    where = Path(where)
    if not (where / META_FILE).is_file() or not (where / PARAMS_FILE).is_file():
        raise FileNotFoundError(
            f"models {where}: no {META_FILE}/{PARAMS_FILE}; expected a `forensics fit-models` "
            "output directory"
        )
    meta = json.loads((where / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StoreError(
            f"models {where}: format {meta.get('format')!r} v{meta.get('version')}, expected "
            f"{FORMAT!r} v{VERSION}"
        )
    models = serialization.msgpack_restore((where / PARAMS_FILE).read_bytes())
    return models, meta


def build_meta(
    cfg: FitConfig,
    report: Mapping[str, Any],
    checkpoint: Mapping[str, str],
    env: Mapping[str, Any],
    store: EpisodeStore,
    seeds: np.ndarray,
    instruments: tuple[str, ...],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "instruments": list(instruments),
        "checkpoint": dict(checkpoint),
        "env": dict(env),
        "store_schema": store_schema(store),
        "data": data_identity(store, seeds),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "report": dict(report),
        "code_version": current_code_version(),
    }
