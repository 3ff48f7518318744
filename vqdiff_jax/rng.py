"""Randomness derived from the seed, the step and a purpose name.

A train step draws all of its randomness from `step_key(seed, step)`, split by
purpose with `purpose_key`. The stream therefore depends only on the seed and
the step: a resumed run replays it exactly. Random arrays are drawn with the
global batch shape inside `jax.jit`; with JAX's partitionable threefry (the
default) each device computes its own slice, so devices get different draws and
the values do not depend on how many devices there are.
"""

import zlib

import jax


def step_key(seed: int, step) -> jax.Array:
    """Key for one train step; `step` may be a traced integer."""
    return jax.random.fold_in(jax.random.key(seed), step)


def purpose_key(key: jax.Array, purpose: str) -> jax.Array:
    """Derive an independent key for a named purpose, e.g. 'noise' or 'label_drop'."""
    return jax.random.fold_in(key, zlib.crc32(purpose.encode()) & 0x7FFFFFFF)
