"""Flat, path-keyed views of pytrees, shared by the tests and the trainer wrapper.

A train state and its raw Orbax restore have different container types
(`TrainState` and optax named tuples against nested dicts and lists) but the
same paths, so both flatten to the same keys, e.g. "opt_state/1/0/count".
"""

import jax
import numpy as np


def path_name(path) -> str:
    """Join a jax key path into "a/b/0/c"."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            raise TypeError(f"Unsupported key {key!r} in path {path!r}.")
    return "/".join(parts)


def flatten(tree, to_numpy=np.asarray) -> dict[str, np.ndarray]:
    """Map every leaf of `tree` to numpy, keyed by `path_name` of its path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(path): to_numpy(leaf) for path, leaf in leaves}


def bitwise_differences(actual: dict, expected: dict) -> list[str]:
    """Names of the leaves whose dtype, shape or bytes differ; missing names count too."""
    differing = sorted(set(actual) ^ set(expected))
    for name in sorted(set(actual) & set(expected)):
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        if a.dtype != e.dtype or a.shape != e.shape or a.tobytes() != e.tobytes():
            differing.append(name)
    return differing
