"""Guards of the trainers: non-finite metrics, bad input batches, incompatible
checkpoints, unwritable work directories and full disks."""

import errno
import itertools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import runs
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from experiments import common, train_dit, train_tokenizer
from experiments.configs import dit_mnist, tokenizer_mnist
from vqdiff_jax import checkpointing, metric_writers, parallel, trainer
from vqdiff_jax.train_state import TrainState

IMAGE_SHAPE = (28, 28, 1)
BATCH_SIZE = 16


# ------------------------------------------------------------------------------------------
# NaN or Inf in the training metrics.
# ------------------------------------------------------------------------------------------


def _toy_state():
    return TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)},
                      opt_state={"count": jnp.zeros((), jnp.int32)})


def _toy_step(bad_step, bad_name, bad_value):
    """Return a train step that adds 1 to w and reports `bad_value` for `bad_name` at `bad_step`."""

    def train_step(state, batch):
        del batch
        step = int(state.step) + 1
        metrics = {"train/loss": 1.0, "train/recon_loss": 0.5, "train/param_norm": 2.0}
        if step == bad_step:
            metrics[bad_name] = bad_value
        metrics = {name: jnp.float32(value) for name, value in metrics.items()}
        params = {"w": state.params["w"] + 1.0}
        return state.replace(step=state.step + 1, params=params), metrics

    return train_step


def _run_toy_loop(tmp_path, train_step, num_steps=6):
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), fingerprint={})
    writer = metric_writers.MetricWriter(str(tmp_path), tensorboard=False)
    loop = trainer.LoopConfig(name="toy", num_steps=num_steps, log_every=1, checkpoint_every=2,
                              loss_names=("train/loss", "train/recon_loss"))
    try:
        return trainer.train_loop(loop, _toy_state(), train_step, itertools.repeat({}),
                                  checkpointer=checkpointer, writer=writer)
    finally:
        writer.close()
        checkpointer.close()


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("bad_step", [3, 4])  # Step 4 would be saved.
def test_nonfinite_loss_stops(tmp_path, bad_step, bad_value):
    train_step = _toy_step(bad_step, "train/recon_loss", bad_value)

    with pytest.raises(FloatingPointError) as raised:
        _run_toy_loop(tmp_path, train_step)

    message = str(raised.value)
    assert f"step {bad_step}:" in message
    assert f"train/recon_loss={bad_value}" in message
    assert "train/loss=" not in message
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), fingerprint={})
    assert checkpointer.all_steps() == [2]
    state, _ = checkpointer.restore(jax.eval_shape(_toy_state))
    checkpointer.close()
    np.testing.assert_array_equal(state.params["w"], [2.0, 2.0])
    logged = [row["step"] for row in metric_writers.read_metrics(str(tmp_path))]
    assert logged == list(range(1, bad_step))


def test_nonfinite_params_stop(tmp_path):
    # The loss of step 4 is finite, but its update made the parameters NaN.
    train_step = _toy_step(4, "train/param_norm", math.nan)

    with pytest.raises(FloatingPointError, match=r"step 4: train/param_norm=nan"):
        _run_toy_loop(tmp_path, train_step)

    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), fingerprint={})
    assert checkpointer.all_steps() == [2]
    checkpointer.close()


def test_finite_loop_saves_all(tmp_path):
    state = _run_toy_loop(tmp_path, _toy_step(0, "train/loss", 1.0))

    assert int(state.step) == 6
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), fingerprint={})
    assert checkpointer.all_steps() == [2, 4, 6]
    checkpointer.close()


# ------------------------------------------------------------------------------------------
# Input batches.
# ------------------------------------------------------------------------------------------


def _images(shape=(BATCH_SIZE, *IMAGE_SHAPE)):
    return np.random.default_rng(0).uniform(-1, 1, size=shape).astype(np.float32)


def test_check_batch_accepts_valid():
    common.check_batch({"image": _images()}, IMAGE_SHAPE, BATCH_SIZE, step=5)


@pytest.mark.parametrize("shape", [
    (BATCH_SIZE, 28, 28, 3),  # Channels.
    (BATCH_SIZE, 32, 32, 1),  # Height and width.
    (BATCH_SIZE // 2, 28, 28, 1),  # Batch size.
    (BATCH_SIZE, 28, 28),  # Rank.
])
def test_check_batch_rejects_shape(shape):
    with pytest.raises(ValueError) as raised:
        common.check_batch({"image": _images(shape)}, IMAGE_SHAPE, BATCH_SIZE, step=5)

    message = str(raised.value)
    assert "step 5" in message
    assert f"image shape {shape}" in message
    assert f"expected {(BATCH_SIZE, *IMAGE_SHAPE)}" in message


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_check_batch_rejects_nonfinite(bad_value):
    images = _images()
    images[3, 10, 7, 0] = bad_value

    with pytest.raises(ValueError, match=r"step 5 contains NaN or Inf pixels"):
        common.check_batch({"image": images}, IMAGE_SHAPE, BATCH_SIZE, step=5)


def test_global_batches_rejects_nan(monkeypatch):
    # The trainers' batch stream checks every batch, numbering steps from start_step.
    images = _images()
    images[0, 0, 0, 0] = np.nan
    batch = {"image": images, "label": np.zeros(BATCH_SIZE, np.int32)}
    monkeypatch.setattr(common.pipeline, "get_train_iterator", lambda **kwargs: iter([batch]))
    config = tokenizer_mnist.get_config("tiny")
    batches = common.global_batches(
        config.data, split="train", batch_size=BATCH_SIZE, seed=0, start_step=7,
        mesh=parallel.make_mesh(), image_shape=IMAGE_SHAPE)

    with pytest.raises(ValueError, match=r"step 7 contains NaN or Inf"):
        next(batches)


# ------------------------------------------------------------------------------------------
# Incompatible checkpoints.
# ------------------------------------------------------------------------------------------


def _save_stand_in_checkpoint(checkpoint_dir, fingerprint):
    # The fingerprint check reads only the metadata, so a stand-in state suffices:
    # if the check were skipped, restoring it would fail with an Orbax structure error.
    checkpointer = checkpointing.Checkpointer(str(checkpoint_dir), fingerprint=fingerprint)
    checkpointer.save(2, {"stand_in": jnp.zeros(1)})
    checkpointer.close()


def test_tokenizer_rejects_changed_model(tmp_path, tmp_path_factory):
    config = tokenizer_mnist.get_config("tiny")
    config.data.data_dir = str(runs.data_dir(tmp_path_factory))
    workdir = tmp_path / "run"
    _save_stand_in_checkpoint(workdir / "checkpoints",
                              train_tokenizer.fingerprint(config, IMAGE_SHAPE))
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.model.channels = 16
    changed.vq.num_codes = 64

    with pytest.raises(checkpointing.IncompatibleCheckpointError) as raised:
        train_tokenizer.train_and_evaluate(changed, str(workdir))

    message = str(raised.value)
    assert "model.channels: checkpoint has 8, config has 16" in message
    assert "vq.num_codes: checkpoint has 32, config has 64" in message
    assert "step 2" in message


def test_dit_rejects_changed_model(tmp_path):
    config = dit_mnist.get_config("tiny")
    config.tokenizer_workdir = str(tmp_path / "tokenizer")
    latent_shape, num_classes, digest = (7, 7, 4), 10, "0123456789abcdef"
    checkpoint_dir = tmp_path / "checkpoints"
    _save_stand_in_checkpoint(checkpoint_dir,
                              train_dit.fingerprint(config, latent_shape, num_classes, digest))
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.model.hidden_size = 64
    checkpointer = checkpointing.Checkpointer(
        str(checkpoint_dir),
        fingerprint=train_dit.fingerprint(changed, latent_shape, num_classes, digest))

    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match=r"model\.hidden_size: checkpoint has 32, config has 64"):
        checkpointer.restore({"stand_in": jax.ShapeDtypeStruct((1,), jnp.float32)})
    checkpointer.close()


def _single_device_shardings(abstract):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract)


def test_restore_rejects_changed_batch_size(tmp_path):
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), fingerprint={})
    checkpointer.save(2, _toy_state().replace(step=jnp.asarray(2, jnp.int32)),
                      {"data_position": 2 * BATCH_SIZE})
    shardings = _single_device_shardings(jax.eval_shape(_toy_state))

    state, meta = trainer.restore_or_init(checkpointer, _toy_state, shardings,
                                          batch_size=BATCH_SIZE)
    with pytest.raises(checkpointing.IncompatibleCheckpointError) as raised:
        trainer.restore_or_init(checkpointer, _toy_state, shardings, batch_size=2 * BATCH_SIZE)
    checkpointer.close()

    assert int(state.step) == 2
    assert meta["data_position"] == 32
    message = str(raised.value)
    assert "saved after 32 training examples" in message
    assert "batch_size=32 would continue at example 64" in message
    assert "(16)" in message


def test_restore_rejects_relabelled_step(tmp_path):
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), fingerprint={})
    checkpointer.save(3, _toy_state().replace(step=jnp.asarray(2, jnp.int32)))
    shardings = _single_device_shardings(jax.eval_shape(_toy_state))

    with pytest.raises(ValueError, match=r"labelled step 3 .* contains state\.step=2"):
        trainer.restore_or_init(checkpointer, _toy_state, shardings)
    checkpointer.close()


@pytest.mark.slow
def test_tokenizer_rejects_changed_batch_size(tmp_path, tmp_path_factory):
    workdir = runs.copy_run_until(runs.tokenizer_reference(tmp_path_factory), tmp_path / "run", 3)
    config = tokenizer_mnist.get_config("tiny")
    config.data.data_dir = str(runs.data_dir(tmp_path_factory))
    config.num_train_steps = runs.NUM_STEPS
    config.batch_size = 2 * BATCH_SIZE

    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match=r"saved after 48 training examples"):
        train_tokenizer.train_and_evaluate(config, str(workdir))


# ------------------------------------------------------------------------------------------
# Unwritable work directory and full disk.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [train_tokenizer, train_dit])
def test_workdir_under_file_rejected(tmp_path, module):
    # A path below a regular file cannot be created, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = (tokenizer_mnist if module is train_tokenizer else dit_mnist).get_config("tiny")

    with pytest.raises(OSError, match=r"Cannot write to the work directory .*file/run"):
        module.train_and_evaluate(config, str(blocker / "run"))


async def _meta_write_fails(self, item, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))


async def _array_write_fails(self, values, infos, args=None):
    # How TensorStore, which writes Orbax's arrays, reports a full disk.
    raise ValueError(
        "RESOURCE_EXHAUSTED: Error writing local file: Failed to write 83 bytes: No space left "
        "on device [os_error_code='28']")


@pytest.mark.parametrize("target, replacement", [
    (json_checkpoint_handler.JsonCheckpointHandler, _meta_write_fails),
    (ocp.type_handlers.ArrayHandler, _array_write_fails),
], ids=["metadata", "arrays"])
def test_full_disk_on_save(tmp_path, monkeypatch, target, replacement):
    directory = tmp_path / "checkpoints"
    checkpointer = checkpointing.Checkpointer(str(directory), fingerprint={})
    checkpointer.save(1, {"w": jnp.ones(3)})
    method = "_save_fn" if target is json_checkpoint_handler.JsonCheckpointHandler else "serialize"
    monkeypatch.setattr(target, method, replacement)

    with pytest.raises(OSError) as raised:
        checkpointer.save(2, {"w": jnp.full(3, 2.0)})

    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert f"step 2 in {str(directory)!r} failed: No space left on device" in message
    assert "Free disk space" in message
    # The same Checkpointer saves nothing more, because Orbax may still be writing step 2.
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"Restart the process"):
        checkpointer.save(3, {"w": jnp.full(3, 3.0)})
    # A new process (here a new Checkpointer) finds step 1 intact.
    reopened = checkpointing.Checkpointer(str(directory), fingerprint={})
    assert reopened.all_steps() == [1]
    state, _ = reopened.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    reopened.close()
    np.testing.assert_array_equal(state["w"], [1.0, 1.0, 1.0])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_full_disk_on_metrics(tmp_path):
    # Writes to /dev/full fail with ENOSPC, like writes to a full disk.
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    writer = metric_writers.MetricWriter(str(tmp_path), tensorboard=False)

    with pytest.raises(OSError) as raised:
        writer.write_scalars(3, {"train/loss": 1.0})
    writer.close()

    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert f"metrics of step 3 to {str(tmp_path / 'metrics.jsonl')!r} failed" in message
    assert "No space left on device" in message


def test_batch_size_zero_rejected():
    mesh = parallel.make_mesh(1)
    with pytest.raises(ValueError, match="batch size 0"):
        parallel.check_batch_size(0, mesh)


@pytest.mark.parametrize("patch_size", [0, -1])
def test_dit_patch_size_not_positive_rejected(patch_size):
    from vqdiff_jax.models import dit
    with pytest.raises(ValueError, match=f"patch_size must be >= 1, got {patch_size}"):
        dit.patchify(jnp.zeros((1, 4, 4, 2)), patch_size)


def test_dit_depth_zero_rejected():
    from vqdiff_jax import latent_diffusion
    model_config = dit_mnist.get_config().model
    model_config.depth = 0
    with pytest.raises(ValueError, match="model.depth .* got 0"):
        latent_diffusion.make_dit(model_config, num_classes=10)
