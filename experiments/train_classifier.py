r"""Train the MNIST classifier used to evaluate samples, and test it on the held-out split.

  python -m experiments.train_classifier \
      --config=experiments/configs/classifier_mnist.py --workdir=workdirs/classifier

Writes into the work directory: `checkpoints/` (Orbax, resumed automatically),
`config.json`, `metrics.jsonl`, `tensorboard/` and `eval_metrics.json`
(held-out accuracy, loss and per-class accuracy). `vqdiff_jax.evaluation.load_classifier`
restores the trained classifier from this work directory.
"""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special
from absl import app, logging

from experiments import common
from vqdiff_jax import checkpointing, evaluation, metric_writers, parallel, trainer
from vqdiff_jax import rng as rng_lib
from vqdiff_jax.data import pipeline
from vqdiff_jax.models import classifier as classifier_lib
from vqdiff_jax.train_state import TrainState, global_norm, make_learning_rate_schedule
from vqdiff_jax.train_state import make_optimizer


def make_train_step(model: classifier_lib.Classifier, tx, schedule, *, seed: int):
    """Build `train_step(state, batch) -> (state, metrics)`, to be jitted by the caller.

    `batch` contains `image` [B, H, W, C] in [-1, 1] and `label` int [B]. Dropout
    draws from `purpose_key(step_key(seed, step), 'dropout')`.
    """

    def loss_fn(params, images, labels, dropout_key):
        logits, _ = model.apply(
            {"params": params}, images, train=True, rngs={"dropout": dropout_key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits

    def train_step(state: TrainState, batch):
        images, labels = batch["image"], batch["label"]
        chex.assert_rank(images, 4)
        chex.assert_rank(labels, 1)
        key = rng_lib.step_key(seed, state.step)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(
            state.params, images, labels, rng_lib.purpose_key(key, "dropout"))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        metrics = {
            "train/loss": loss,
            "train/accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels),
            "train/grad_norm": global_norm(grads),
            "train/param_norm": global_norm(params),
            "train/learning_rate": schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def evaluate(model, params, images, labels, *, batch_size: int) -> dict:
    """Accuracy, mean cross-entropy and per-class accuracy on images [N, H, W, C]."""
    _, logits = evaluation.classifier_features_and_logits(
        model, params, images, batch_size=batch_size)
    log_probs = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
    loss = -np.mean(np.take_along_axis(log_probs, labels[:, None], axis=-1))
    return {
        "accuracy": evaluation.accuracy(logits, labels),
        "loss": float(loss),
        "per_class_accuracy": evaluation.per_class_accuracy(logits, labels),
        "num_images": int(len(images)),
    }


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or resume) the classifier in `workdir` and return the held-out metrics."""
    parallel.maybe_initialize_distributed(config)
    workdir = common.prepare_workdir(config, workdir, "classifier")

    # Data.
    mesh = parallel.make_mesh()
    info = common.prepare_data(config.data)
    if not info.has_labels:
        raise ValueError(
            f"Dataset {config.data.dataset!r} has no `label` feature, so a classifier cannot "
            "be trained on it. Choose a labelled dataset in data.dataset.")
    image_shape = common.image_shape(config.data, info)
    eval_images, eval_labels = pipeline.load_split_as_arrays(
        config.data.dataset, config.data.eval_split, config.data.data_dir,
        image_size=config.data.image_size, crop=config.data.crop)

    # Model, optimizer and state on the mesh, resumed if a checkpoint exists.
    model = classifier_lib.make_classifier(config.model, info.num_classes)
    classifier_lib.check_image_shape(model, image_shape)
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    init_fn = functools.partial(
        classifier_lib.init_state, model, tx, jax.random.key(config.seed), image_shape)
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), jax.eval_shape(init_fn))
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        fingerprint=classifier_lib.fingerprint(config.model, image_shape, info.num_classes),
        max_to_keep=config.max_checkpoints)
    state, _ = trainer.restore_or_init(checkpointer, init_fn, state_sharding,
                                       batch_size=config.batch_size)
    start_step = int(jax.device_get(state.step))

    # The jitted step: batch sharded over `data`, state replicated and donated.
    schedule = make_learning_rate_schedule(config.optimizer, config.num_train_steps)
    train_step = jax.jit(
        make_train_step(model, tx, schedule, seed=config.seed),
        in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0,
        compiler_options=parallel.conv_compiler_options(),
    )
    batches = common.global_batches(
        config.data, split=config.data.train_split, batch_size=config.batch_size,
        seed=config.seed, start_step=start_step, mesh=mesh, image_shape=image_shape)

    def eval_fn(state, step):
        metrics = evaluate(
            model, state.params, eval_images, eval_labels, batch_size=config.eval_batch_size)
        logging.info("[classifier] eval at step %d: accuracy %.4f, loss %.4f",
                     step, metrics["accuracy"], metrics["loss"])
        return {"eval/accuracy": metrics["accuracy"], "eval/loss": metrics["loss"]}

    writer = metric_writers.MetricWriter(workdir, start_step=start_step)
    loop = trainer.LoopConfig(
        name="classifier", num_steps=config.num_train_steps, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every,
        loss_names=("train/loss",))
    state = trainer.train_loop(
        loop, state, train_step, batches, checkpointer=checkpointer, writer=writer,
        eval_fn=eval_fn,
        checkpoint_meta=lambda step: {"data_position": step * config.batch_size})

    # Final held-out evaluation.
    metrics = evaluate(
        model, state.params, eval_images, eval_labels, batch_size=config.eval_batch_size)
    metrics["step"] = int(jax.device_get(state.step))
    common.write_json(os.path.join(workdir, "eval_metrics.json"), metrics)
    logging.info("[classifier] held-out accuracy %.4f on %d images at step %d.",
                 metrics["accuracy"], metrics["num_images"], metrics["step"])
    writer.close()
    checkpointer.close()
    return metrics


main = common.trainer_main(train_and_evaluate)


def define_flags() -> None:
    """Define the command-line flags; called only when the module runs as a script."""
    common.define_trainer_flags(
        config_help="Classifier config file.",
        workdir_help="Directory for checkpoints, metrics and eval_metrics.json.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
