"""VQ-VAE tokenizer: state initialisation, the jitted train step and evaluation.

The train step, for a global batch of images x [B, H, W, C] in [-1, 1]:
  1. z_e = encode(x); codes = nearest code of z_e in the CURRENT codebook;
     z_q = codebook[codes]; the decoder gets z_e + stop_gradient(z_q - z_e).
  2. loss = mse(decode(.), x) + codebook loss (learned codebook only)
            + commitment_weight * commitment loss.
  3. The optimizer updates the encoder/decoder (and a learned codebook).
  4. With an EMA codebook, its statistics are updated from z_e and codes of the
     whole global batch; then codes whose EMA count fell below a threshold are
     restarted from encoder outputs of the batch.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqdiff_jax import parallel, quantizer
from vqdiff_jax import rng as rng_lib
from vqdiff_jax.models.vqvae import VQVAE, init_params
from vqdiff_jax.train_state import TrainState, global_norm

CODEBOOK_MODES = ("ema", "learned")


def check_vq_config(vq_config) -> None:
    if vq_config.num_codes < 1:
        raise ValueError(
            f"vq.num_codes (the codebook size) must be >= 1, got {vq_config.num_codes}.")
    if vq_config.codebook not in CODEBOOK_MODES:
        raise ValueError(
            f"vq.codebook must be one of {CODEBOOK_MODES}, got {vq_config.codebook!r}.")
    if not 0.0 <= vq_config.ema_decay < 1.0:
        raise ValueError(f"vq.ema_decay must be in [0, 1), got {vq_config.ema_decay}.")


def init_state(model: VQVAE, vq_config, tx, key, image_shape) -> TrainState:
    """Fresh train state for images of shape [H, W, C]."""
    check_vq_config(vq_config)
    model_key, code_key = jax.random.split(key)
    params = {"model": init_params(model, model_key, image_shape)}
    vq = quantizer.init_vq_state(
        code_key, vq_config.num_codes, model.code_dim, l2_normalize=model.l2_normalize)
    if vq_config.codebook == "learned":
        # A copy, so that the parameter and the EMA state never share a buffer (the train
        # step donates both).
        params["codebook"] = jnp.array(vq.codebook, copy=True)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), vq=vq)


def current_codebook(state: TrainState) -> jax.Array:
    """Return the codebook used for lookup [K, D]: learned parameters or the EMA codebook."""
    if "codebook" in state.params:
        return state.params["codebook"]
    return state.vq.codebook


def _quantize(model: VQVAE, codebook, z_e):
    codebook = quantizer.l2_normalize(codebook) if model.l2_normalize else codebook
    codes = quantizer.nearest_codes(z_e, codebook)
    return quantizer.lookup(codebook, codes), codes


def psnr_per_image(x, x_rec) -> jax.Array:
    """PSNR in dB of each image, with pixels mapped from [-1, 1] to [0, 1] and clipped. [B]"""
    x01 = (x + 1.0) / 2.0
    rec01 = jnp.clip((x_rec + 1.0) / 2.0, 0.0, 1.0)
    mse = jnp.mean((x01 - rec01) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def make_train_step(model: VQVAE, vq_config, tx, *, seed: int):
    """Build `train_step(state, batch) -> (state, metrics)`, to be jitted by the caller."""
    learned = vq_config.codebook == "learned"

    def loss_fn(params, codebook, images):
        z_e = model.apply({"params": params["model"]}, images, method=VQVAE.encode)
        if learned:
            codebook = params["codebook"]
        z_q, codes = _quantize(model, codebook, z_e)
        vq_terms = quantizer.vq_loss(
            z_e, z_q, commitment_weight=vq_config.commitment_weight, learned_codebook=learned)
        # Straight-through: the decoder gets z_q, and the gradient goes to z_e.
        z_st = quantizer.straight_through(z_e, z_q)
        recon = model.apply({"params": params["model"]}, z_st, method=VQVAE.decode)
        recon_loss = jnp.mean((recon - images) ** 2)
        loss = recon_loss + vq_terms["loss"]
        return loss, dict(z_e=z_e, codes=codes, recon=recon, recon_loss=recon_loss, **vq_terms)

    def train_step(state: TrainState, batch):
        images = batch["image"]
        chex.assert_rank(images, 4)
        key = rng_lib.step_key(seed, state.step)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, state.vq.codebook, images)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        z_e = jax.lax.stop_gradient(aux["z_e"])
        vq = state.vq
        if not learned:
            vq = quantizer.ema_update(
                vq, z_e, aux["codes"], decay=vq_config.ema_decay, eps=vq_config.ema_eps,
                l2_normalize=model.l2_normalize)
        vq, params, num_restarted = _maybe_restart(
            vq, params, z_e, rng_lib.purpose_key(key, "restart"), state.step, vq_config)

        counts = quantizer.code_histogram(aux["codes"], vq_config.num_codes)
        usage = quantizer.usage_metrics(
            counts, cluster_size=vq.cluster_size, dead_threshold=vq_config.dead_code_threshold)
        metrics = {
            "train/loss": loss,
            "train/recon_loss": aux["recon_loss"],
            "train/commitment_loss": aux["commitment_loss"],
            "train/codebook_loss": aux["codebook_loss"],
            "train/psnr": jnp.mean(psnr_per_image(images, aux["recon"])),
            "train/grad_norm": global_norm(grads),
            "train/param_norm": global_norm(params),
            "vq/perplexity": usage["perplexity"],
            "vq/codes_used_fraction": usage["codes_used_fraction"],
            "vq/dead_codes": usage["dead_codes"],
            "vq/restarted_codes": num_restarted,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, vq=vq)
        return new_state, metrics

    return train_step


def _maybe_restart(vq, params, z_e, key, step, vq_config):
    """Restart dead codes every `restart_every` steps; at step 0, initialise every code.

    Step 0 treats every code as dead, so the codebook starts as a sample of
    encoder outputs instead of random vectors far from the data.
    """
    if not vq_config.restart_every:
        return vq, params, jnp.zeros((), jnp.int32)
    threshold = jnp.where(step == 0, jnp.inf, vq_config.dead_code_threshold)
    due = (step % vq_config.restart_every == 0) | (step == 0)
    if "codebook" in params:
        # A learned codebook: the restart acts on the parameters, and the EMA
        # statistics in `vq` only track usage.
        vq = vq.replace(codebook=params["codebook"])
    restarted, num = quantizer.restart_dead_codes(vq, z_e, key, threshold=threshold)
    vq = jax.tree.map(lambda new, old: jnp.where(due, new, old), restarted, vq)
    num = jnp.where(due, num, 0)
    if "codebook" in params:
        params = {**params, "codebook": vq.codebook}
    return vq, params, num


@parallel.conv_jit(static_argnums=(0,))
def reconstruct(model: VQVAE, params, codebook, images):
    """Encode, quantize and decode images [B, H, W, C]; return (recon, codes [B, h, w])."""
    z_e = model.apply({"params": params["model"]}, images, method=VQVAE.encode)
    z_q, codes = _quantize(model, codebook, z_e)
    recon = model.apply({"params": params["model"]}, z_q, method=VQVAE.decode)
    return recon, codes


@parallel.conv_jit(static_argnums=(0,))
def encode_to_codes(model: VQVAE, params, codebook, images):
    """Codes [B, h, w] and quantized vectors z_q [B, h, w, D] of images [B, H, W, C]."""
    z_e = model.apply({"params": params["model"]}, images, method=VQVAE.encode)
    z_q, codes = _quantize(model, codebook, z_e)
    return z_q, codes


@parallel.conv_jit(static_argnums=(0,))
def decode_vectors(model: VQVAE, params, z_q):
    """Decode quantized vectors [B, h, w, D] to images [B, H, W, C]."""
    return model.apply({"params": params["model"]}, z_q, method=VQVAE.decode)


def evaluate(model: VQVAE, state: TrainState, images: np.ndarray, *, batch_size: int,
             num_codes: int) -> tuple[dict, np.ndarray]:
    """Reconstruction and codebook-usage metrics on held-out images [N, H, W, C].

    Returns (metrics, reconstructions); PSNR is averaged over images, usage is
    from the histogram of every code of every image (`code_counts`, [K]).
    """
    codebook = current_codebook(state)
    psnrs, recons, counts = [], [], np.zeros(num_codes, np.float64)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        recon, codes = reconstruct(model, state.params, codebook, jnp.asarray(chunk))
        psnrs.append(np.asarray(psnr_per_image(jnp.asarray(chunk), recon)))
        recons.append(np.asarray(recon))
        counts += np.bincount(np.asarray(codes).ravel(), minlength=num_codes)
    usage = quantizer.usage_metrics(jnp.asarray(counts, jnp.float32))
    metrics = {
        "psnr": float(np.mean(np.concatenate(psnrs))),
        "codes_used": int(usage["codes_used"]),
        "codes_used_fraction": float(usage["codes_used_fraction"]),
        "perplexity": float(usage["perplexity"]),
        "num_images": int(len(images)),
        "code_counts": counts.astype(int).tolist(),
    }
    return metrics, np.concatenate(recons)
