"""Set-up shared by the experiment modules: work directory, config file, data, batches."""

import json
import logging as logging_std
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from absl import flags, logging
from ml_collections import config_flags

from vqdiff_jax import checkpointing, parallel
from vqdiff_jax.data import pipeline, sharding


class _LibraryInfoFilter(logging_std.Filter):
    """Drop INFO records of installed libraries (Orbax logs every file it writes)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or "site-packages" not in record.pathname


def configure_logging() -> None:
    """Keep the console to this project's progress lines, warnings and errors."""
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def prepare_workdir(config, workdir: str, name: str) -> str:
    """Create and check `workdir`, write `config.json` there, return the absolute path."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    checkpointing.check_writable(workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    logging.info("[%s] work directory: %s", name, workdir)
    return workdir


def prepare_data(data_config):
    """Build the dataset if it can be built offline; return its info.

    Process 0 builds; the others wait for it, so that concurrent builds never
    write the same folder of a shared data directory.
    """
    if jax.process_index() == 0:
        pipeline.prepare_dataset(data_config.dataset, data_config.data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_data")
        pipeline.prepare_dataset(data_config.dataset, data_config.data_dir)
    return pipeline.dataset_info(data_config.dataset, data_config.data_dir)


def image_shape(data_config, info) -> tuple[int, int, int]:
    height, width, channels = info.image_shape
    if data_config.image_size:
        height = width = data_config.image_size
    elif data_config.crop == "center" and height and width:
        height = width = min(height, width)
    if height is None or width is None:
        raise ValueError(
            f"Dataset {info.name!r} has images of varying size; set data.image_size to resize "
            "them (with data.crop='center' for a square crop).")
    return (height, width, channels)


def check_batch(batch: dict, expected_image_shape, global_batch_size: int, step: int) -> None:
    """Reject a host batch with the wrong shape or non-finite pixels, naming the step."""
    images = batch["image"]
    process_batch = global_batch_size // jax.process_count()
    expected = (process_batch, *expected_image_shape)
    if tuple(images.shape) != expected:
        raise ValueError(
            f"Input batch for step {step} has image shape {tuple(images.shape)}, expected "
            f"{expected} ([batch, height, width, channels]); check data.image_size and the "
            "dataset.")
    if not np.all(np.isfinite(images)):
        raise ValueError(
            f"Input batch for step {step} contains NaN or Inf pixels; check the dataset and "
            "its preprocessing.")


def global_batches(data_config, *, split: str, batch_size: int, seed: int, start_step: int,
                   mesh, image_shape):
    """Yield global batches sharded over `mesh`, starting at step `start_step`."""
    parallel.check_batch_size(batch_size, mesh)
    local = pipeline.get_train_iterator(
        dataset=data_config.dataset,
        split=split,
        data_dir=data_config.data_dir,
        global_batch_size=batch_size,
        image_size=data_config.image_size,
        crop=data_config.crop,
        shuffle=True,
        seed=seed,
        start_step=start_step,
    )
    step = start_step
    for batch in local:
        check_batch(batch, image_shape, batch_size, step)
        yield sharding.make_global_batch(batch, mesh)
        step += 1


def write_json(path: str, payload: dict) -> None:
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def define_trainer_flags(*, config_help: str, workdir_help: str) -> None:
    """Define the required --config and --workdir flags of a trainer module.

    Called only when a module runs as a script, so that a pipeline can import
    several trainer modules without absl rejecting duplicate flag names.
    """
    config_flags.DEFINE_config_file("config", None, config_help)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])


def trainer_main(train_and_evaluate):
    """Return an absl `main` that runs `train_and_evaluate(config, workdir)` from the flags."""

    def main(argv):
        del argv
        configure_logging()
        # jax.distributed must start before anything initialises the XLA backend.
        parallel.maybe_initialize_distributed(flags.FLAGS.config)
        jnp.zeros(())  # Initialise the JAX backend before TensorFlow claims devices.
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)

    return main
