r"""Train the VQ-VAE tokenizer and evaluate it on the held-out split.

  python -m experiments.train_tokenizer \
      --config=experiments/configs/tokenizer_mnist.py --workdir=workdirs/tokenizer

Writes into the work directory: `checkpoints/` (Orbax, resumed automatically),
`metrics.jsonl` and `tensorboard/`, `recon_<step>.png` (held-out images on
the odd rows, their reconstructions below them) and `eval_metrics.json`.
"""

import functools
import json
import os

import jax
import numpy as np
import ml_collections
from absl import app, logging

from experiments import common
from vqdiff_jax import checkpointing, images as images_lib, metric_writers, parallel, tokenizer
from vqdiff_jax import trainer
from vqdiff_jax.data import pipeline
from vqdiff_jax.models.vqvae import make_vqvae
from vqdiff_jax.train_state import make_optimizer


def fingerprint(config, image_shape) -> dict:
    """Config fields that fix the structure of the saved state."""
    return {
        "image_shape": list(image_shape),
        "model": config.model.to_dict(),
        "vq": {"num_codes": config.vq.num_codes, "codebook": config.vq.codebook},
    }


def build(config, image_shape):
    """Model, optimizer and the init function of the train state."""
    model = make_vqvae(config.model, image_channels=image_shape[-1])
    model.check_images(np.zeros((1, *image_shape), np.float32))
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    init_fn = functools.partial(
        tokenizer.init_state, model, config.vq, tx, jax.random.key(config.seed), image_shape)
    return model, tx, init_fn


def save_reconstructions(path, images, recon, num=16):
    num = min(num, len(images))
    rows = []
    for start in range(0, num, 8):
        rows += [images[start:start + 8], recon[start:start + 8]]
    images_lib.save_grid(path, np.concatenate(rows), num_columns=8, scale=2)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or resume) the tokenizer in `workdir`; return the held-out metrics."""
    parallel.maybe_initialize_distributed(config)
    workdir = common.prepare_workdir(config, workdir, "tokenizer")

    # Data.
    mesh = parallel.make_mesh()
    info = common.prepare_data(config.data)
    image_shape = common.image_shape(config.data, info)
    eval_images, _ = pipeline.load_split_as_arrays(
        config.data.dataset, config.data.eval_split, config.data.data_dir,
        image_size=config.data.image_size, crop=config.data.crop)
    eval_images = eval_images[:config.num_eval_images]

    # Model, optimizer and state on the mesh, resumed if a checkpoint exists.
    model, tx, init_fn = build(config, image_shape)
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), jax.eval_shape(init_fn))
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), fingerprint=fingerprint(config, image_shape),
        max_to_keep=config.max_checkpoints)
    state, _ = trainer.restore_or_init(checkpointer, init_fn, state_sharding,
                                       batch_size=config.batch_size)
    start_step = int(jax.device_get(state.step))

    # The jitted step: batch sharded over `data`, state replicated and donated.
    train_step = jax.jit(
        tokenizer.make_train_step(model, config.vq, tx, seed=config.seed),
        in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0,
        compiler_options=parallel.conv_compiler_options(),
    )
    batches = common.global_batches(
        config.data, split=config.data.train_split, batch_size=config.batch_size,
        seed=config.seed, start_step=start_step, mesh=mesh, image_shape=image_shape)

    def eval_fn(state, step):
        metrics, recon = tokenizer.evaluate(
            model, state, eval_images, batch_size=config.eval_batch_size,
            num_codes=config.vq.num_codes)
        if jax.process_index() == 0:
            save_reconstructions(os.path.join(workdir, f"recon_{step:06d}.png"), eval_images, recon)
        scalars = {k: v for k, v in metrics.items() if k != "code_counts"}
        logging.info("[tokenizer] eval at step %d: %s", step, scalars)
        return {f"eval/{k}": v for k, v in scalars.items()}

    writer = metric_writers.MetricWriter(workdir, start_step=start_step)
    loop = trainer.LoopConfig(
        name="tokenizer", num_steps=config.num_train_steps, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every,
        loss_names=("train/loss", "train/recon_loss", "train/commitment_loss"))
    state = trainer.train_loop(
        loop, state, train_step, batches, checkpointer=checkpointer, writer=writer,
        eval_fn=eval_fn,
        checkpoint_meta=lambda step: {"data_position": step * config.batch_size})

    # Final held-out evaluation.
    metrics, recon = tokenizer.evaluate(
        model, state, eval_images, batch_size=config.eval_batch_size,
        num_codes=config.vq.num_codes)
    metrics["step"] = int(jax.device_get(state.step))
    common.write_json(os.path.join(workdir, "eval_metrics.json"), metrics)
    if jax.process_index() == 0:
        save_reconstructions(os.path.join(workdir, "reconstructions.png"), eval_images, recon)
    logging.info("[tokenizer] held-out metrics: %s",
                 {k: v for k, v in metrics.items() if k != "code_counts"})
    writer.close()
    checkpointer.close()
    return metrics


def load_tokenizer(workdir: str):
    """Restore a trained tokenizer from its work directory.

    Returns (model, state, config). Raises FileNotFoundError naming the command
    that creates the checkpoint when `workdir` contains none.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config_path = os.path.join(workdir, "config.json")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not os.path.exists(config_path) or not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(
            f"No tokenizer checkpoint in {workdir!r}. Train one first with: python -m "
            f"experiments.train_tokenizer --config=experiments/configs/tokenizer_mnist.py "
            f"--workdir={workdir}")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    info = pipeline.dataset_info(config.data.dataset, config.data.data_dir)
    image_shape = common.image_shape(config.data, info)
    model, _, init_fn = build(config, image_shape)
    checkpointer = checkpointing.Checkpointer(
        checkpoint_dir, fingerprint=fingerprint(config, image_shape), max_to_keep=None)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(
            f"No tokenizer checkpoint in {checkpoint_dir!r}. Train one first with: python -m "
            f"experiments.train_tokenizer --config=experiments/configs/tokenizer_mnist.py "
            f"--workdir={workdir}")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = checkpointing.abstract_like(jax.eval_shape(init_fn), sharding)
    state, _ = checkpointer.restore(abstract)
    checkpointer.close()
    return model, state, config


main = common.trainer_main(train_and_evaluate)


def define_flags() -> None:
    """Define the command-line flags; called only when the module runs as a script."""
    common.define_trainer_flags(
        config_help="Tokenizer config file.",
        workdir_help="Directory for checkpoints, metrics and images.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
