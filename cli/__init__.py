"""The ``forensics`` command line: one thin module per subcommand (see ``cli.main``)."""

from __future__ import annotations

import os
from pathlib import Path


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk across invocations.

    Resuming a run, evaluating it and later stages recompile the same jitted functions
    (tens of seconds each on a small CPU); JAX's persistent cache turns repeats into a
    file read. ``JAX_COMPILATION_CACHE_DIR`` chooses the place; the default is
    ``$XDG_CACHE_HOME/marl-forensics/jax`` (``~/.cache/...``).
    """
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        jax.config.update("jax_compilation_cache_dir", str(cache_home / "marl-forensics" / "jax"))
