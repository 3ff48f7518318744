"""Latent diffusion on top of a trained tokenizer: latents, the DiT train step, sampling.

The DiT is trained on the tokenizer's quantized vectors z_q [N, h, w, D] of the
training images, normalised per channel with statistics that are saved in the
DiT checkpoint's metadata. Sampling runs the DiT sampler in that normalised
space, maps the result back, snaps every vector to its nearest codebook entry
and decodes the codes with the tokenizer's decoder.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqdiff_jax import diffusion, quantizer
from vqdiff_jax import rng as rng_lib
from vqdiff_jax.models.dit import DiT, dit_from_preset
from vqdiff_jax.train_state import TrainState, global_norm, update_ema

SAMPLERS = ("ddim", "ddpm")


# ------------------------------------------------------------------------------------------
# Latents and their normalisation.
# ------------------------------------------------------------------------------------------


def latent_statistics(latents: np.ndarray) -> dict:
    """Per-channel mean and std of latents [N, h, w, D], as lists for JSON metadata."""
    flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    std = np.maximum(flat.std(axis=0), 1e-6)
    return {"mean": flat.mean(axis=0).tolist(), "std": std.tolist()}


def normalize(latents, stats: dict):
    return (latents - jnp.asarray(stats["mean"], jnp.float32)) / jnp.asarray(
        stats["std"], jnp.float32)


def denormalize(latents, stats: dict):
    return latents * jnp.asarray(stats["std"], jnp.float32) + jnp.asarray(
        stats["mean"], jnp.float32)


class LatentBatches:
    """Deterministic, resumable global batches from in-memory latents and labels.

    Epoch e visits the examples in the order of a permutation drawn from
    (seed, e); each epoch yields len // batch_size full batches. The batch at
    step s is therefore a function of (seed, s) alone, so a resumed run sees the
    same batches as an uninterrupted one. Each process keeps only its own slice
    of every global batch.
    """

    def __init__(self, latents: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                 start_step: int = 0, shuffle: bool = True):
        if len(latents) < batch_size:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {len(latents)} training latents; "
                "lower batch_size.")
        self.latents, self.labels = latents, labels
        self.batch_size, self.seed, self.step, self.shuffle = batch_size, seed, start_step, shuffle
        self.batches_per_epoch = len(latents) // batch_size

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        order = np.arange(len(self.latents))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.latents))
        global_indices = order[position * self.batch_size:(position + 1) * self.batch_size]
        per_process = self.batch_size // jax.process_count()
        start = jax.process_index() * per_process
        return global_indices[start:start + per_process]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx = self.indices(self.step)
        self.step += 1
        return {"latent": self.latents[idx], "label": self.labels[idx]}


# ------------------------------------------------------------------------------------------
# Model, schedule and state.
# ------------------------------------------------------------------------------------------


def make_dit(model_config, num_classes: int) -> DiT:
    """Build the DiT from a preset name, or from explicit sizes when `preset` is None."""
    common = dict(num_classes=num_classes, learn_sigma=model_config.learn_sigma,
                  class_dropout_prob=model_config.class_dropout_prob,
                  dtype=jnp.dtype(model_config.dtype))
    if model_config.preset:
        return dit_from_preset(model_config.preset, **common)
    if model_config.depth < 1:
        raise ValueError(f"model.depth (the number of DiT blocks) must be >= 1, got "
                         f"{model_config.depth}.")
    return DiT(patch_size=model_config.patch_size, hidden_size=model_config.hidden_size,
               depth=model_config.depth, num_heads=model_config.num_heads,
               mlp_ratio=model_config.mlp_ratio, **common)


def make_schedule(diffusion_config) -> diffusion.DiffusionSchedule:
    if diffusion_config.beta_schedule == "linear":
        betas = diffusion.linear_beta_schedule(
            diffusion_config.num_timesteps, diffusion_config.beta_start, diffusion_config.beta_end)
    elif diffusion_config.beta_schedule == "cosine":
        betas = diffusion.cosine_beta_schedule(diffusion_config.num_timesteps)
    else:
        raise ValueError(
            f"diffusion.beta_schedule must be 'linear' or 'cosine', got "
            f"{diffusion_config.beta_schedule!r}.")
    return diffusion.make_schedule(betas)


def init_state(model: DiT, tx, key, latent_shape) -> TrainState:
    """Fresh DiT train state (with weight EMA) for latents of shape [h, w, D]."""
    x = jnp.zeros((1, *latent_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32)
    params = model.init(key, x, t, y, train=False)["params"]
    # A copy, so that params and ema_params never share a buffer (the train step donates both).
    ema_params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=ema_params)


def make_train_step(model: DiT, schedule, diffusion_config, tx, *, seed: int, ema_decay: float):
    """Build `train_step(state, batch) -> (state, metrics)` for batches of normalised latents.

    Timesteps, noise and label drops are drawn for the whole global batch from
    the key of (seed, step), so every device gets different draws and the draws
    do not depend on the device count.
    """
    prediction_type = diffusion_config.prediction_type

    def train_step(state: TrainState, batch):
        x_0, y = batch["latent"], batch["label"]
        chex.assert_rank(x_0, 4)
        key = rng_lib.step_key(seed, state.step)
        t = jax.random.randint(rng_lib.purpose_key(key, "time"), (x_0.shape[0],), 0,
                               diffusion_config.num_timesteps)
        eps = jax.random.normal(rng_lib.purpose_key(key, "noise"), x_0.shape, x_0.dtype)
        x_t = diffusion.q_sample(schedule, x_0, t, eps)
        drop_key = rng_lib.purpose_key(key, "label_drop")

        def loss_fn(params):
            output = model.apply({"params": params}, x_t, t, y, train=True,
                                 rngs={"label_drop": drop_key})
            terms = diffusion.diffusion_loss(
                schedule, output, x_0, x_t, t, eps, prediction_type=prediction_type,
                learned_variance=model.learn_sigma)
            return terms["loss"], terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA warm-up: the decay grows as (1 + n) / (10 + n) up to `ema_decay`, so the
        # average does not stay close to the initial weights in short runs.
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        ema_params = update_ema(state.ema_params, params, decay)

        metrics = {
            "train/loss": loss,
            "train/mse": terms["mse"],
            "train/vlb": terms["vlb"],
            "train/grad_norm": global_norm(grads),
            "train/param_norm": global_norm(params),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params)
        return new_state, metrics

    return train_step


# ------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------


def check_sampling_args(*, guidance_scale: float, num_steps: int, num_timesteps: int,
                        sampler: str, per_class: int | None = None) -> None:
    """Raise ValueError naming the setting when a sampling argument is out of range.

    `per_class`, the number of images per class that experiments.sample_dit draws, is
    checked only when given.
    """
    if not 0.0 <= guidance_scale <= 100.0:
        raise ValueError(
            f"guidance_scale must be in [0, 100] (0: unconditional, 1: conditional without "
            f"guidance), got {guidance_scale}.")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"The number of sampling steps must be in [1, {num_timesteps}] (the training "
            f"timesteps), got {num_steps}.")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if per_class is not None and per_class < 1:
        raise ValueError(
            f"per_class (images per class) must be >= 1, got {per_class}. Set "
            "--config.sample.per_class for train_dit or --per_class for sample_dit.")


@functools.partial(
    jax.jit,
    static_argnames=("model", "num_steps", "sampler", "spacing", "prediction_type",
                     "latent_shape", "return_trajectory"))
def sample_latents(model: DiT, params, schedule, labels, key, *, guidance_scale, num_steps: int,
                   sampler: str, spacing: str, prediction_type: str, eta=0.0,
                   latent_shape: tuple[int, int, int], return_trajectory: bool = False):
    """Sample normalised latents [B, h, w, D] for integer labels [B] with guidance.

    `guidance_scale` is traced, so changing it does not recompile. With
    `return_trajectory`, also returns the predicted x_t after every step
    [S, B, h, w, D].
    """
    x_T = jax.random.normal(rng_lib.purpose_key(key, "x_T"), (labels.shape[0], *latent_shape))

    def apply_fn(x, t, y):
        return model.apply({"params": params}, x, t, y, train=False)

    model_fn = diffusion.guided_model_fn(
        apply_fn, labels, model.num_classes, guidance_scale, latent_shape[-1])
    loop_key = rng_lib.purpose_key(key, "sampler")
    if sampler == "ddim":
        return diffusion.ddim_sample(
            model_fn, schedule, x_T, loop_key, num_steps=num_steps, eta=eta, spacing=spacing,
            prediction_type=prediction_type, return_trajectory=return_trajectory)
    return diffusion.ddpm_sample(
        model_fn, schedule, x_T, loop_key, num_steps=num_steps, spacing=spacing,
        prediction_type=prediction_type, learned_variance=model.learn_sigma,
        return_trajectory=return_trajectory)


def latents_to_codes(latents, stats: dict, codebook):
    """Map normalised latents [B, h, w, D] back and snap them to codes [B, h, w]."""
    return quantizer.nearest_codes(denormalize(latents, stats), codebook)
