"""A fixed-capacity ring buffer over a pytree of transitions, pure and jittable.

Every leaf of ``data`` has a leading axis of size ``capacity``. ``add`` writes a batch
of B transitions at slots ``(pos + k) mod capacity`` for k = 0..B-1 (overwriting the
oldest once full), or only the rows a ``keep`` mask selects, packed in order (padding
steps of finished episodes never take a slot); ``sample`` draws indices uniformly from
the ``size`` filled slots, with replacement. The buffer is itself a pytree, so it lives
inside a train state, crosses ``jit``/``lax.scan`` boundaries and is checkpointed with
everything else.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Pytree = Any


class ReplayBuffer(struct.PyTreeNode):
    data: Pytree  # leaves [capacity, ...]
    pos: jax.Array  # int32 [], the next slot to write
    size: jax.Array  # int32 [], filled slots, ≤ capacity

    @property
    def capacity(self) -> int:
        return jax.tree_util.tree_leaves(self.data)[0].shape[0]


def init(example: Pytree, capacity: int) -> ReplayBuffer:
    """An empty buffer whose slots have the shapes/dtypes of one ``example`` transition."""
    if capacity < 1:
        raise ValueError(f"replay capacity must be >= 1, got {capacity}")
    data = jax.tree_util.tree_map(
        lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example
    )
    return ReplayBuffer(data=data, pos=jnp.int32(0), size=jnp.int32(0))


def add(buffer: ReplayBuffer, batch: Pytree, keep: jax.Array | None = None) -> ReplayBuffer:
    """Write a batch (leaves [B, ...], B ≤ capacity) at the ring position; with ``keep``
    (bool [B]) only the kept rows, in their order, at slots ``pos, pos + 1, ...``."""
    capacity = buffer.capacity
    batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if batch_size > capacity:
        raise ValueError(f"replay: batch of {batch_size} exceeds capacity {capacity}")
    if keep is None:
        keep = jnp.ones(batch_size, bool)
    offset = jnp.cumsum(keep) - 1  # kept row k goes to the (k+1)-th free slot
    count = jnp.sum(keep, dtype=jnp.int32)
    idx = jnp.where(keep, (buffer.pos + offset) % capacity, capacity)  # capacity: dropped
    data = jax.tree_util.tree_map(lambda d, b: d.at[idx].set(b, mode="drop"), buffer.data, batch)
    return buffer.replace(
        data=data,
        pos=(buffer.pos + count) % capacity,
        size=jnp.minimum(buffer.size + count, capacity),
    )


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Pytree:
    """``batch_size`` transitions drawn uniformly, with replacement, from the filled slots.

    Sampling an empty buffer returns slot 0 (zeros); callers gate on ``buffer.size``.
    """
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree_util.tree_map(lambda d: d[idx], buffer.data)
