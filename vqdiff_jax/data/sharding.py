"""Assembling per-process host batches into global arrays on the device mesh."""

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, axis: str = "data"
) -> dict[str, jax.Array]:
    """Build global arrays, sharded along `axis` of `mesh`, from this process's batch.

    Each process passes its own `[local_batch, ...]` arrays. The result has
    `[local_batch * jax.process_count(), ...]` rows, split evenly over the
    devices along `axis` and replicated over any other mesh axes.

    Args:
      local_batch: dict of numpy arrays with the same leading size, e.g. the
        output of `get_train_iterator`.
      mesh: the device mesh.
      axis: the mesh axis that splits the batch.

    Raises:
      ValueError: if `axis` is not a mesh axis, the arrays disagree on the
        batch size, or the global batch is not divisible by the devices on
        `axis`.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"Mesh axis '{axis}' not found. The mesh has axes {mesh.axis_names}.")
    local_sizes = {key: np.shape(value)[0] for key, value in local_batch.items()}
    if len(set(local_sizes.values())) != 1:
        raise ValueError(f"Batch arrays have different leading sizes: {local_sizes}.")

    local_size = next(iter(local_sizes.values()))
    global_size = local_size * jax.process_count()
    num_shards = mesh.shape[axis]
    if global_size % num_shards:
        raise ValueError(
            f"Global batch size {global_size} ({local_size} per process x "
            f"{jax.process_count()} processes) is not divisible by the {num_shards} devices "
            f"on mesh axis '{axis}'. Use a global batch size that is a multiple of {num_shards}."
        )

    sharding = NamedSharding(mesh, P(axis))
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value, (global_size, *np.shape(value)[1:])
        )
        for key, value in local_batch.items()
    }
