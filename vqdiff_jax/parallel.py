"""Device mesh and shardings for data-parallel training.

Every trainer uses a 1-D mesh with the axis `data` over all devices (of all
processes). Batches are sharded on `data`, the train state is replicated, and
`jax.jit` inserts the gradient all-reduce. Because the step is written for the
global batch, sums and means inside it (codebook statistics, losses, histograms)
are over the whole global batch whatever the number of devices.
"""

import functools
import os

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
    if global_batch_size < 1:
        raise ValueError(
            f"Invalid global batch size {global_batch_size}, expected >= 1; set batch_size to "
            f"a positive multiple of the number of devices ({num_devices}).")
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


# XLA:CPU option that keeps convolutions out of YNNPACK and sends only matrix products there.
_CPU_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_CPU_FUSION_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


@functools.cache
def conv_compiler_options() -> dict[str, str]:
    """Return `jax.jit` compiler options that speed up convolutional models on CPU.

    jaxlib 0.10 sends convolutions to YNNPACK on CPU by default. On a 2-core AMD EPYC
    (Zen 4) its 3x3 convolutions ran at half the rate of XLA's own convolution path, and
    the option below made the MNIST tokenizer train step about 2x faster
    (benchmarks/README.md). The option is experimental, so it is used only where the
    default backend is the CPU and a small program compiles with it; otherwise this returns
    {} and jit behaves as usual. GPU and TPU programs never get it. Set the environment
    variable VQDIFF_DEFAULT_CPU_CONV=1 to turn it off.
    """
    if jax.default_backend() != "cpu" or os.environ.get("VQDIFF_DEFAULT_CPU_CONV") == "1":
        return {}
    options = {_CPU_FUSION_OPTION: _CPU_FUSION_VALUE}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.zeros(2, np.float32)).compile()
    except Exception as error:  # This jaxlib does not know the option or its value.
        logging.info("CPU convolution option not used (%s).", error)
        return {}
    return options


def conv_jit(fun=None, **jit_kwargs):
    """`jax.jit` with `conv_compiler_options()`, for functions of convolutional models.

    The options are looked up on the first call, not at import, so importing a module
    that uses this decorator does not start a backend. Use as `@conv_jit` or
    `@conv_jit(static_argnums=...)`.
    """
    if fun is None:
        return functools.partial(conv_jit, **jit_kwargs)

    @functools.cache
    def compiled():
        return jax.jit(fun, compiler_options=conv_compiler_options(), **jit_kwargs)

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        return compiled()(*args, **kwargs)

    return wrapper
