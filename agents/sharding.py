"""Data parallelism over the visible devices: a 1-D mesh whose one axis is ``batch``.

Rows of a batch that never interact — the parallel environments of a training iteration,
the episodes of a diagnose batch — are split across devices along their batch axis, each
device holding ``size / d`` rows; parameters and the rest of the state are replicated. A
batch is placed with ``jax.device_put`` (``shard_batch``), or pinned inside a jitted
function with ``with_sharding_constraint`` (``constrain_batch``); ``jit`` propagates the
layout through the computation and XLA inserts the collectives where rows meet (a mean over
the batch, the replay buffer). Random numbers do not depend on the layout
(``jax_threefry_partitionable``), so sharded and unsharded runs agree up to the summation
order of reductions.

With one device, or a batch size that no device count above 1 divides, there is no mesh
(``batch_mesh`` returns None) and every helper leaves single-device programs as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

BATCH = "batch"  # the mesh axis name


def batch_mesh(size: int, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """A mesh over the first d of ``devices`` (default: all visible), d the largest device
    count that divides ``size`` (so every device holds the same number of rows); None if
    d = 1."""
    devices = list(jax.devices() if devices is None else devices)
    d = max(k for k in range(1, len(devices) + 1) if size % k == 0)
    return None if d == 1 else Mesh(np.array(devices[:d]), (BATCH,))


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Split dimension ``axis`` of an ``ndim``-dimensional array over the mesh."""
    spec = [None] * ndim
    spec[axis] = BATCH
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh | None) -> jax.sharding.Sharding:
    """A whole copy on every mesh device; without a mesh, the default device."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree: Any, mesh: Mesh | None, axis: int = 0) -> Any:
    """Put every leaf (host or device array) on the devices, split along ``axis``;
    without a mesh, ``jnp.asarray`` of each leaf."""
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, tree)
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x), axis)), tree
    )


def constrain_batch(tree: Any, mesh: Mesh | None, axis: int = 0) -> Any:
    """Inside ``jit``: require every leaf to be split along ``axis`` (identity without a
    mesh)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim, axis)), tree
    )
