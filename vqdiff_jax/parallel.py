"""Device mesh and shardings for data-parallel training.

Every trainer uses a 1-D mesh with the axis `data` over all devices (of all
processes). Batches are sharded on `data`, the train state is replicated, and
`jax.jit` inserts the gradient all-reduce. Because the step is written for the
global batch, sums and means inside it (codebook statistics, losses, histograms)
are over the whole global batch whatever the number of devices.
"""

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """Build a 1-D `data` mesh over the first `num_devices` devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"num_devices={num_devices} is out of range: {len(devices)} device(s) are visible."
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays whose leading axis is the global batch."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"The global batch size {global_batch_size} is not divisible by the number of "
            f"devices {num_devices}; set the batch size to a multiple of {num_devices}."
        )


def maybe_initialize_distributed(config) -> None:
    """Call `jax.distributed.initialize` when the config requests a multi-host run.

    `config.distributed` contains `coordinator_address`, `num_processes` and
    `process_id`. On Cloud TPU and SLURM, leaving them empty lets JAX detect the
    cluster; `enabled=False` (the default) runs a single process.
    """
    dist = config.get("distributed")
    if dist is None or not dist.enabled:
        return
    kwargs = {}
    if dist.coordinator_address:
        kwargs = dict(
            coordinator_address=dist.coordinator_address,
            num_processes=dist.num_processes,
            process_id=dist.process_id,
        )
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed initialised: process %d of %d, %d global device(s).",
        jax.process_index(), jax.process_count(), jax.device_count(),
    )
