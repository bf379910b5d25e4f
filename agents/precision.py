"""Matrix products in IEEE float32 for the computations whose answer is a small difference.

XLA on recent NVIDIA GPUs (Ampere, Hopper) multiplies float32 matrices in TF32 by default: a
10-bit mantissa, relative error ~1e-3 per product. Training tolerates that; forensics does
not. The paper's Stage-1 statistic is a Taylor remainder |J(o+η) − J(o) − gᵀη| at ε = 0.01,
a difference of O(1) costs that is itself ~1e-4, and the curvature terms D, X and the attack
onsets (the sign of D) are second-order quantities. Measured on an H200 (results/gpu-*.csv,
``numerics:*`` rows): under the default precision the Stage-1 statistic differs from the CPU's
by up to 68× its float32 tolerance and Q by 9×; under ``highest`` every case agrees with the
CPU within 0.05 of it. On the CPU both are the same program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import jax

F = TypeVar("F", bound=Callable)


def float32_matmuls(fn: F) -> F:
    """``fn`` traced and run with ``jax.default_matmul_precision("highest")`` (full float32
    products). Wrap the outermost jitted call: the precision is part of its cache key."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
