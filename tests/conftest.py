"""Strict settings for the whole suite (in the spirit of equinox's tests)."""

import os

# Tests compile many small programs; XLA's heavy optimization passes only slow them down.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402

# Implicit rank promotion hides shape bugs in library code: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
