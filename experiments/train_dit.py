r"""Train a class-conditional DiT in the latent space of a trained tokenizer.

  python -m experiments.train_dit --config=experiments/configs/dit_mnist.py \
      --config.tokenizer_workdir=workdirs/tokenizer --workdir=workdirs/dit

Writes into the work directory: `latents.npz` (the training set encoded once,
with its labels), `checkpoints/` (Orbax, whose metadata contains the latent
normalisation statistics; resumed automatically), `metrics.jsonl`,
`tensorboard/` and `samples_<step>.png` (one row per class, from the EMA weights).
"""

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, logging

from experiments import common, train_tokenizer
from vqdiff_jax import checkpointing, images as images_lib, latent_diffusion, metric_writers
from vqdiff_jax import parallel, tokenizer, trainer
from vqdiff_jax.data import pipeline, sharding
from vqdiff_jax.train_state import make_optimizer


def encode_training_set(tok_model, tok_state, tok_config, path: str, batch_size: int):
    """Encode the tokenizer's training split once and cache it in `path`.

    Returns (latents [N, h, w, D] float32, labels [N] int32).
    """
    source = tokenizer_digest(tok_state)
    if os.path.exists(path):
        with np.load(path) as cached:
            cached_source = str(cached["tokenizer_workdir"]) if "tokenizer_workdir" in cached else ""
            if cached_source != source:
                raise ValueError(
                    f"The cached latents {path!r} were encoded by another tokenizer (codebook "
                    f"digest {cached_source!r}, this one has {source!r}). Delete the file to "
                    "encode again, or point config.tokenizer_workdir at the original tokenizer.")
            return cached["latents"], cached["labels"]
    images, labels = pipeline.load_split_as_arrays(
        tok_config.data.dataset, tok_config.data.train_split, tok_config.data.data_dir,
        image_size=tok_config.data.image_size, crop=tok_config.data.crop)
    codebook = tokenizer.current_codebook(tok_state)
    latents = []
    for start in range(0, len(images), batch_size):
        z_q, _ = tokenizer.encode_to_codes(
            tok_model, tok_state.params, codebook, jnp.asarray(images[start:start + batch_size]))
        latents.append(np.asarray(z_q))
    latents = np.concatenate(latents).astype(np.float32)
    labels = np.asarray(labels, np.int32)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, latents=latents, labels=labels, tokenizer_workdir=np.asarray(source))
        os.replace(tmp, path)
    logging.info("[dit] encoded %d training images to latents of shape %s.", len(latents),
                 latents.shape[1:])
    return latents, labels


def tokenizer_digest(tok_state) -> str:
    """Hash the tokenizer's codebook into a short id of its latent space.

    The id survives moving the tokenizer's work directory, unlike its path.
    """
    codebook = np.asarray(jax.device_get(tokenizer.current_codebook(tok_state)), np.float32)
    return hashlib.sha256(codebook.tobytes()).hexdigest()[:16]


def fingerprint(config, latent_shape, num_classes, tok_digest: str) -> dict:
    """Config fields that fix the saved state, and the tokenizer whose latents it models."""
    return {"latent_shape": list(latent_shape), "num_classes": int(num_classes),
            "model": config.model.to_dict(), "tokenizer_codebook_digest": tok_digest}


def decode_samples(tok_model, tok_state, latents, stats):
    """Snap normalised latents [B, h, w, D] to codes and decode them to images [B, H, W, C]."""
    codebook = tokenizer.current_codebook(tok_state)
    # In training the DiT state is replicated on the mesh, but the tokenizer is on one device.
    # Copying the latents to the host lets jit place them on the tokenizer's device.
    latents = jax.device_get(latents)
    codes = latent_diffusion.latents_to_codes(latents, stats, codebook)
    z_q = jnp.take(codebook, codes, axis=0)
    return tokenizer.decode_vectors(tok_model, tok_state.params, z_q)


def generate(model, ema_params, schedule, stats, tok_model, tok_state, labels, sample_config,
             *, prediction_type: str, latent_shape, key, num_timesteps: int):
    """Generate images [N, H, W, C] in [-1, 1] for labels [N] with the configured sampler."""
    latent_diffusion.check_sampling_args(
        guidance_scale=sample_config.guidance_scale, num_steps=sample_config.num_steps,
        num_timesteps=num_timesteps, sampler=sample_config.sampler)
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(
            f"Requested class labels must lie in [0, {model.num_classes - 1}] "
            f"(num_classes={model.num_classes}), got min {labels.min()} and max "
            f"{labels.max()}.")
    outputs = []
    for start in range(0, len(labels), sample_config.batch_size):
        chunk = jnp.asarray(labels[start:start + sample_config.batch_size], jnp.int32)
        latents = latent_diffusion.sample_latents(
            model, ema_params, schedule, chunk, jax.random.fold_in(key, start),
            guidance_scale=sample_config.guidance_scale, num_steps=sample_config.num_steps,
            sampler=sample_config.sampler, spacing=sample_config.spacing,
            prediction_type=prediction_type, eta=sample_config.eta,
            latent_shape=tuple(latent_shape))
        outputs.append(np.asarray(decode_samples(tok_model, tok_state, latents, stats)))
    return np.concatenate(outputs)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train (or resume) the DiT in `workdir`; return a summary of the run."""
    parallel.maybe_initialize_distributed(config)
    workdir = common.prepare_workdir(config, workdir, "dit")
    if not config.tokenizer_workdir:
        raise ValueError(
            "config.tokenizer_workdir is not set. Pass --config.tokenizer_workdir=DIR, the "
            "work directory of experiments.train_tokenizer.")

    # Tokenizer and latents.
    tok_model, tok_state, tok_config = train_tokenizer.load_tokenizer(config.tokenizer_workdir)
    latents, labels = encode_training_set(
        tok_model, tok_state, tok_config,
        config.latents_path or os.path.join(workdir, "latents.npz"),
        config.encode_batch_size)
    num_classes = pipeline.dataset_info(
        tok_config.data.dataset, tok_config.data.data_dir).num_classes
    if not np.all(np.isfinite(latents)):
        raise ValueError(f"The tokenizer in {config.tokenizer_workdir!r} produced NaN or Inf "
                         "latents; check its checkpoint or retrain it.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Training labels must lie in [0, {num_classes - 1}] for a dataset with "
            f"{num_classes} classes, got min {labels.min()} and max {labels.max()}.")
    stats = latent_diffusion.latent_statistics(latents)
    latent_shape = latents.shape[1:]
    normalized = np.asarray(latent_diffusion.normalize(latents, stats))

    # Model, optimizer and state on the mesh, resumed if a checkpoint exists.
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    model = latent_diffusion.make_dit(config.model, num_classes)
    schedule = latent_diffusion.make_schedule(config.diffusion)
    # Checked now, so that a bad sampling setting fails before training, not at the first grid.
    latent_diffusion.check_sampling_args(
        guidance_scale=config.sample.guidance_scale, num_steps=config.sample.num_steps,
        num_timesteps=config.diffusion.num_timesteps, sampler=config.sample.sampler,
        per_class=config.sample.per_class)
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    init_fn = functools.partial(
        latent_diffusion.init_state, model, tx, jax.random.key(config.seed), latent_shape)
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), jax.eval_shape(init_fn))
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        fingerprint=fingerprint(config, latent_shape, num_classes, tokenizer_digest(tok_state)),
        max_to_keep=config.max_checkpoints)
    state, meta = trainer.restore_or_init(checkpointer, init_fn, state_sharding,
                                          batch_size=config.batch_size)
    if meta.get("latent_stats"):
        stats = meta["latent_stats"]
    start_step = int(jax.device_get(state.step))

    train_step = jax.jit(
        latent_diffusion.make_train_step(
            model, schedule, config.diffusion, tx, seed=config.seed, ema_decay=config.ema_decay),
        in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    batches = (
        sharding.make_global_batch(batch, mesh)
        for batch in latent_diffusion.LatentBatches(
            normalized, labels, batch_size=config.batch_size, seed=config.seed,
            start_step=start_step))

    def sample_grid(state, step, per_class=10):
        grid_labels = np.repeat(np.arange(num_classes), per_class)
        sample_config = config.sample.copy_and_resolve_references()
        sample_config.batch_size = len(grid_labels)
        images = generate(
            model, state.ema_params, schedule, stats, tok_model, tok_state, grid_labels,
            sample_config, prediction_type=config.diffusion.prediction_type,
            latent_shape=latent_shape, key=jax.random.key(config.sample.seed),
            num_timesteps=config.diffusion.num_timesteps)
        if jax.process_index() == 0:
            images_lib.save_grid(os.path.join(workdir, f"samples_{step:06d}.png"), images,
                                 num_columns=per_class, scale=2)
        return {}

    writer = metric_writers.MetricWriter(workdir, start_step=start_step)
    loop = trainer.LoopConfig(
        name="dit", num_steps=config.num_train_steps, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every,
        loss_names=("train/loss", "train/mse"))
    state = trainer.train_loop(
        loop, state, train_step, batches, checkpointer=checkpointer, writer=writer,
        eval_fn=sample_grid,
        checkpoint_meta=lambda step: {
            "latent_stats": stats, "tokenizer_workdir": os.path.abspath(config.tokenizer_workdir),
            "num_classes": int(num_classes), "data_position": step * config.batch_size})
    writer.close()
    checkpointer.close()
    return {"step": int(jax.device_get(state.step)), "resumed_from": start_step}


def load_dit(workdir: str):
    """Restore a trained DiT and everything needed to sample from it.

    Returns a dict with `config`, `model`, `state`, `schedule`, `stats` (latent
    normalisation), `latent_shape`, `num_classes`, `tokenizer` (model, state,
    config). Raises FileNotFoundError naming the command that creates the
    checkpoint when `workdir` contains none.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    command = ("python -m experiments.train_dit --config=experiments/configs/dit_mnist.py "
               f"--config.tokenizer_workdir=TOKENIZER_WORKDIR --workdir={workdir}")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"No DiT run in {workdir!r}. Train one first with: {command}")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), fingerprint=None, max_to_keep=None)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"No DiT checkpoint in {workdir!r}. Train one first with: {command}")
    meta = checkpointer.read_meta()
    latent_shape = tuple(meta["fingerprint"]["latent_shape"])
    num_classes = meta["num_classes"]
    model = latent_diffusion.make_dit(config.model, num_classes)
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    init_fn = functools.partial(
        latent_diffusion.init_state, model, tx, jax.random.key(config.seed), latent_shape)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state, meta = checkpointer.restore(
        checkpointing.abstract_like(jax.eval_shape(init_fn), sharding))
    checkpointer.close()
    return {
        "config": config, "model": model, "state": state, "stats": meta["latent_stats"],
        "schedule": latent_diffusion.make_schedule(config.diffusion),
        "latent_shape": latent_shape, "num_classes": num_classes,
        "tokenizer": train_tokenizer.load_tokenizer(meta["tokenizer_workdir"]),
    }


main = common.trainer_main(train_and_evaluate)


def define_flags() -> None:
    """Define the command-line flags; called only when the module runs as a script."""
    common.define_trainer_flags(
        config_help="DiT config file.",
        workdir_help="Directory for checkpoints, metrics and images.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
