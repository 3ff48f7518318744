"""Gaussian diffusion for the latent DiT: noise schedules, training loss, DDPM and DDIM samplers.

Every function is pure and takes its RNG key explicitly. Schedules are computed in float64 numpy
and stored as float32 arrays in a `DiffusionSchedule` pytree, so they can be passed to jitted
functions like any other argument.

Conventions used throughout:
  * `t` indexes the schedule from 0 (least noise) to T - 1 (most noise).
  * `alpha_bar_t` is the product of (1 - beta_s) for s = 0..t, and
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
  * prediction types: 'eps' (the noise), 'x0' (the clean latent) and
    'v' = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.
  * A model with learned variance returns 2C channels for C latent channels: the prediction,
    then values in [-1, 1]. These interpolate the log variance between the clipped log
    posterior variance (-1) and log beta_t (+1), as the learned-range variance of the DiT
    reference code (facebookresearch/DiT, diffusion/gaussian_diffusion.py) does.

The samplers run one `lax.scan` over an int32 timestep array, so the timesteps are traced values
and the model is traced once per sampler call. A jitted wrapper that takes `timesteps` as an
argument compiles once for every timestep array of the same length.
"""

import math
from collections.abc import Callable

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("eps", "v", "x0")
SPACING_MODES = ("leading", "trailing", "linspace")
FIXED_VARIANCES = ("small", "large")

# model_fn(x_t [B, H, W, C], t int32 [B]) -> [B, H, W, C], or [B, H, W, 2C] with learned variance.
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def linear_beta_schedule(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Return `num_timesteps` betas evenly spaced from `beta_start` to `beta_end` (float64)."""
    _check_num_timesteps(num_timesteps)
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_beta_schedule(
    num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
) -> np.ndarray:
    """Return the betas of the cosine schedule (float64).

    alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2) ** 2 for u in [0, 1], and
    beta_t = 1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), capped at `max_beta` so that the
    last steps, where alpha_bar reaches 0, keep a finite signal-to-noise ratio.
    """
    _check_num_timesteps(num_timesteps)
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((u + s) / (1.0 + s) * np.pi / 2.0) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.minimum(betas, max_beta)


@flax.struct.dataclass
class DiffusionSchedule:
    """Per-timestep constants of a Gaussian diffusion, each a float32 array of shape [T]."""

    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array  # alpha_bar_{t-1}, with 1.0 at t = 0
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / alpha_bar - 1)
    # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance).
    posterior_variance: jax.Array
    # The posterior variance is 0 at t = 0, so its log there is replaced by the value at t = 1.
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(betas) -> DiffusionSchedule:
    """Build a `DiffusionSchedule` from betas [T], computing in float64 and storing float32.

    Raises:
        ValueError: if `betas` is not 1-D with at least 2 entries, or has a value outside (0, 1).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(
            f"betas must be a 1-D array with at least 2 timesteps, got shape {betas.shape}."
        )
    if not np.all((betas > 0.0) & (betas < 1.0)):
        bad = betas[~((betas > 0.0) & (betas < 1.0))]
        raise ValueError(
            f"Every beta must lie in the open interval (0, 1), got {bad[:5].tolist()}. "
            "Cap the schedule below 1 (for example max_beta=0.999)."
        )

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

    table = {
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(
            np.append(posterior_variance[1], posterior_variance[1:])
        ),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (
            (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
        ),
    }
    return DiffusionSchedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in table.items()})


# ----------------------------------------------------------------------------------------------
# Forward process, targets and training loss
# ----------------------------------------------------------------------------------------------


def _gather(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gather `values[t]` and reshape to [B, 1, ..., 1] to broadcast against a rank-`ndim` array."""
    return values[t].reshape(t.shape + (1,) * (ndim - 1))


def _check_batch(x: jax.Array, t: jax.Array) -> None:
    chex.assert_rank(t, 1)
    chex.assert_type(t, int)
    chex.assert_axis_dimension(x, 0, t.shape[0])


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}."
        )


def q_sample(
    schedule: DiffusionSchedule, x_0: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """Noise `x_0` to timestep `t`: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Args:
      schedule: the diffusion constants.
      x_0: clean latents [batch, height, width, channels].
      t: int32 timesteps [batch].
      eps: standard normal noise, same shape as `x_0`.

    Returns:
      x_t, same shape as `x_0`.
    """
    chex.assert_equal_shape([x_0, eps])
    _check_batch(x_0, t)
    return (
        _gather(schedule.sqrt_alphas_cumprod, t, x_0.ndim) * x_0
        + _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_0.ndim) * eps
    )


def training_target(
    schedule: DiffusionSchedule,
    x_0: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    prediction_type: str,
) -> jax.Array:
    """Return what the model should output for `prediction_type` ('eps', 'v' or 'x0').

    Shapes as in `q_sample`, and the target has the shape of `x_0`.
    """
    _check_prediction_type(prediction_type)
    chex.assert_equal_shape([x_0, eps])
    _check_batch(x_0, t)
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x_0
    return (
        _gather(schedule.sqrt_alphas_cumprod, t, x_0.ndim) * eps
        - _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_0.ndim) * x_0
    )


def _x0_and_eps(x_t, model_output, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, prediction_type):
    """Convert a prediction to (x_0, eps) given sqrt(alpha_bar) and sqrt(1 - alpha_bar)."""
    if prediction_type == "eps":
        eps_pred = model_output
        x0_pred = (x_t - sqrt_one_minus_alpha_bar * eps_pred) / sqrt_alpha_bar
    elif prediction_type == "x0":
        x0_pred = model_output
        eps_pred = (x_t - sqrt_alpha_bar * x0_pred) / sqrt_one_minus_alpha_bar
    else:
        # v = sqrt(a) eps - sqrt(1 - a) x_0 and x_t = sqrt(a) x_0 + sqrt(1 - a) eps form a
        # rotation of (x_0, eps), so its transpose inverts it.
        x0_pred = sqrt_alpha_bar * x_t - sqrt_one_minus_alpha_bar * model_output
        eps_pred = sqrt_one_minus_alpha_bar * x_t + sqrt_alpha_bar * model_output
    return x0_pred, eps_pred


def predict_x0_and_eps(
    schedule: DiffusionSchedule,
    x_t: jax.Array,
    t: jax.Array,
    model_output: jax.Array,
    prediction_type: str,
) -> tuple[jax.Array, jax.Array]:
    """Convert a model prediction at timestep `t` into predictions of x_0 and eps.

    Args:
      schedule: the diffusion constants.
      x_t: noisy latents [batch, height, width, channels].
      t: int32 timesteps [batch].
      model_output: the prediction part of the model output, same shape as `x_t` (split off the
        variance channels of a learned-variance model first).
      prediction_type: 'eps', 'v' or 'x0'.

    Returns:
      (x0_pred, eps_pred), each the shape of `x_t`.
    """
    _check_prediction_type(prediction_type)
    chex.assert_equal_shape([x_t, model_output])
    _check_batch(x_t, t)
    return _x0_and_eps(
        x_t,
        model_output,
        _gather(schedule.sqrt_alphas_cumprod, t, x_t.ndim),
        _gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim),
        prediction_type,
    )


def _split_model_output(model_output, latent_channels, learned_variance):
    """Split [..., C] or [..., 2C] into (prediction, variance values or None)."""
    channels = model_output.shape[-1]
    if learned_variance:
        if channels != 2 * latent_channels:
            raise ValueError(
                f"With learned_variance=True the model output needs 2 * {latent_channels} = "
                f"{2 * latent_channels} channels, got {channels}."
            )
        return model_output[..., :latent_channels], model_output[..., latent_channels:]
    if channels not in (latent_channels, 2 * latent_channels):
        raise ValueError(
            f"The model output needs {latent_channels} channels (or {2 * latent_channels} with "
            f"variance channels, which are then ignored), got {channels}."
        )
    return model_output[..., :latent_channels], None


def _mean_over_non_batch(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean_1, log_var_1, mean_2, log_var_2) -> jax.Array:
    """Return KL(N(mean_1, exp(log_var_1)) || N(mean_2, exp(log_var_2))) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + log_var_2
        - log_var_1
        + jnp.exp(log_var_1 - log_var_2)
        + jnp.square(mean_1 - mean_2) * jnp.exp(-log_var_2)
    )


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> jax.Array:
    """Return the elementwise log probability of 8-bit data `x` in [-1, 1] under a Gaussian.

    Each value owns a bin of width 2 / 255 around it, and the two edge bins extend to -inf and
    +inf.
    """
    centered = x - mean
    inv_scale = jnp.exp(-log_scale)
    upper = inv_scale * (centered + 1.0 / 255.0)
    lower = inv_scale * (centered - 1.0 / 255.0)
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)
    log_survival_lower = jax.scipy.special.log_ndtr(-lower)
    bin_mass = jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower)
    log_bin_mass = jnp.log(jnp.maximum(bin_mass, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_survival_lower, log_bin_mass)
    )


def diffusion_loss(
    schedule: DiffusionSchedule,
    model_output: jax.Array,
    x_0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    *,
    prediction_type: str,
    learned_variance: bool,
    vlb_weight: float = 1e-3,
) -> dict[str, jax.Array]:
    """Compute the diffusion training loss, a scalar averaged over the batch.

    The MSE compares the first C output channels with `training_target`. With learned variance,
    the loss adds vlb_weight * T * L_t, where L_t is the variational bound term at `t` in bits
    per dimension: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretized
    decoder negative log likelihood for t = 0. T * L_t is an unbiased estimate of the whole
    bound for uniformly drawn t. With T = 1000 the default weight 1e-3 gives mse + L_t, the
    loss of the DiT reference code. The bound receives the predicted mean through
    `stop_gradient`, so it trains only the variance channels.

    Args:
      schedule: the diffusion constants.
      model_output: [batch, height, width, C], or [..., 2C] when `learned_variance`.
      x_0: clean latents [batch, height, width, C].
      x_t: `q_sample(schedule, x_0, t, eps)`.
      t: int32 timesteps [batch].
      eps: the noise that produced `x_t`.
      prediction_type: 'eps', 'v' or 'x0'.
      learned_variance: whether `model_output` carries C variance channels after the prediction.
      vlb_weight: weight of the bound estimate T * L_t.

    Returns:
      dict with scalars 'loss' (mse + vlb_weight * T * vlb), 'mse' and 'vlb' (mean L_t in bits
      per dimension, 0 without learned variance).
    """
    _check_prediction_type(prediction_type)
    chex.assert_equal_shape([x_0, x_t, eps])
    _check_batch(x_0, t)
    model_output = model_output.astype(jnp.float32)
    prediction, variance_values = _split_model_output(model_output, x_0.shape[-1], learned_variance)

    target = training_target(schedule, x_0, t, eps, prediction_type)
    mse = jnp.mean(jnp.square(prediction - target))
    if not learned_variance:
        vlb = jnp.zeros((), jnp.float32)
        return {"loss": mse, "mse": mse, "vlb": vlb}

    # The model's posterior, with the mean frozen so the bound trains only the variance.
    x0_pred, _ = predict_x0_and_eps(
        schedule, x_t, t, jax.lax.stop_gradient(prediction), prediction_type
    )
    coef1 = _gather(schedule.posterior_mean_coef1, t, x_t.ndim)
    coef2 = _gather(schedule.posterior_mean_coef2, t, x_t.ndim)
    model_mean = coef1 * x0_pred + coef2 * x_t
    min_log = _gather(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    max_log = _gather(schedule.log_betas, t, x_t.ndim)
    fraction = (variance_values + 1.0) / 2.0
    model_log_variance = fraction * max_log + (1.0 - fraction) * min_log

    true_mean = coef1 * x_0 + coef2 * x_t
    kl = _mean_over_non_batch(normal_kl(true_mean, min_log, model_mean, model_log_variance))
    # NOTE: the t = 0 decoder term assumes 8-bit data scaled to [-1, 1], as in the DiT
    # reference, although latents are continuous. It only trains the variance at t = 0.
    decoder_nll = -_mean_over_non_batch(
        discretized_gaussian_log_likelihood(x_0, model_mean, 0.5 * model_log_variance)
    )
    vlb = jnp.mean(jnp.where(t == 0, decoder_nll, kl)) / math.log(2.0)

    loss = mse + vlb_weight * schedule.num_timesteps * vlb
    return {"loss": loss, "mse": mse, "vlb": vlb}


# ----------------------------------------------------------------------------------------------
# Sampling building blocks
# ----------------------------------------------------------------------------------------------


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")


def timestep_spacing(num_timesteps: int, num_steps: int, mode: str) -> np.ndarray:
    """Choose `num_steps` of the `num_timesteps` schedule indices for a sampler, in descending order.

    Modes:
      'leading': multiples of T // S from 0 (T = 1000, S = 10 gives 900, 800, ..., 0). The
        first step, (S - 1) * (T // S), lies below T - 1 unless S = T, and is 0 for S = 1, so
        few-step samplers should prefer 'trailing' or 'linspace'.
      'trailing': round(T - i * T / S) - 1, always starting at T - 1 (999, 899, ..., 99).
      'linspace': S points evenly spaced over [0, T - 1], rounded half to even as numpy rounds
        (999, 888, ..., 111, 0). With S = 1 the single step is T - 1.

    Returns:
      int32 [num_steps], strictly decreasing, every entry in [0, num_timesteps - 1].

    Raises:
      ValueError: if `num_steps` is outside [1, num_timesteps] or `mode` is unknown.
    """
    _check_num_timesteps(num_timesteps)
    if mode not in SPACING_MODES:
        raise ValueError(f"Unknown spacing {mode!r}; expected one of {SPACING_MODES}.")
    if (
        not isinstance(num_steps, (int, np.integer))
        or isinstance(num_steps, bool)
        or not 1 <= num_steps <= num_timesteps
    ):
        raise ValueError(
            f"num_steps must be an integer in [1, {num_timesteps}] (the number of timesteps), "
            f"got {num_steps!r}."
        )

    if mode == "leading":
        timesteps = np.arange(num_steps) * (num_timesteps // num_steps)
    elif mode == "trailing":
        timesteps = np.round(num_timesteps - np.arange(num_steps) * num_timesteps / num_steps) - 1
    elif num_steps == 1:
        timesteps = np.array([num_timesteps - 1])
    else:
        timesteps = np.round(np.linspace(0, num_timesteps - 1, num_steps))
    return np.sort(timesteps.astype(np.int32))[::-1].copy()


def alpha_bar_pairs(
    schedule: DiffusionSchedule, timesteps: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Return (alpha_bar_t, alpha_bar_prev) [S] for the steps of a sampler over `timesteps` [S].

    Step i moves from timesteps[i] to timesteps[i + 1], and the last step moves to
    alpha_bar = 1, the clean latent.
    """
    alpha_bar_t = schedule.alphas_cumprod[timesteps]
    alpha_bar_prev = jnp.concatenate([alpha_bar_t[1:], jnp.ones((1,), alpha_bar_t.dtype)])
    return alpha_bar_t, alpha_bar_prev


def _ddim_update(x0_pred, eps_pred, alpha_bar_t, alpha_bar_prev, eta, noise):
    """Take a DDIM step from predictions of x_0 and eps."""
    sigma = (
        eta
        * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t))
        * jnp.sqrt(1.0 - alpha_bar_t / alpha_bar_prev)
    )
    # The clamp only absorbs float rounding, because sigma^2 <= 1 - alpha_bar_prev when eta <= 1.
    eps_scale = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - jnp.square(sigma), 0.0))
    x_prev = jnp.sqrt(alpha_bar_prev) * x0_pred + eps_scale * eps_pred
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_step(x_t, eps_pred, alpha_bar_t, alpha_bar_prev, eta, noise=None) -> jax.Array:
    """Take one DDIM step from alpha_bar_t to alpha_bar_prev (> alpha_bar_t).

    x_0 is predicted as (x_t - sqrt(1 - a_t) eps_pred) / sqrt(a_t), and
    x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps_pred + sigma noise, where
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev). eta = 0 is deterministic
    DDIM and eta = 1 has the DDPM posterior variance. Scalars broadcast against the arrays.

    Args:
      x_t: noisy latents.
      eps_pred: predicted noise, same shape as `x_t`.
      alpha_bar_t: alpha_bar at the current timestep.
      alpha_bar_prev: alpha_bar at the target timestep (1.0 for the final step).
      eta: noise scale, usually in [0, 1].
      noise: standard normal noise of `x_t`'s shape; may be None only when eta is 0.
    """
    if noise is None and not isinstance(eta, jax.core.Tracer) and np.any(np.asarray(eta) != 0):
        raise ValueError(
            f"ddim_step with eta={eta} needs noise. Pass standard normal noise of x_t's shape."
        )
    x0_pred = (x_t - jnp.sqrt(1.0 - alpha_bar_t) * eps_pred) / jnp.sqrt(alpha_bar_t)
    return _ddim_update(x0_pred, eps_pred, alpha_bar_t, alpha_bar_prev, eta, noise)


def _check_guidance_scale(scale) -> None:
    if isinstance(scale, jax.core.Tracer):
        return
    if np.any(np.asarray(scale) < 0):
        raise ValueError(
            f"Guidance scale must be >= 0 (0 is unconditional, 1 is conditional), got {scale}."
        )


def classifier_free_guidance(
    model_output_cond: jax.Array,
    model_output_uncond: jax.Array,
    scale,
    latent_channels: int,
) -> jax.Array:
    """Combine conditional and unconditional outputs: uncond + scale * (cond - uncond).

    Guidance applies to all of the first `latent_channels` channels. Any further channels
    (learned variance) are taken from the conditional output unchanged. The combination is
    written as cond + (scale - 1) * (cond - uncond) so that scale 1 returns the conditional
    output bit for bit.

    Args:
      model_output_cond: [batch, height, width, channels], conditional pass.
      model_output_uncond: same shape, pass with the null label.
      scale: guidance scale >= 0; 0 is unconditional and 1 is conditional.
      latent_channels: number of leading channels that predict the latent.
    """
    _check_guidance_scale(scale)
    chex.assert_equal_shape([model_output_cond, model_output_uncond])
    if not 1 <= latent_channels <= model_output_cond.shape[-1]:
        raise ValueError(
            f"latent_channels must be in [1, {model_output_cond.shape[-1]}] (the output "
            f"channels), got {latent_channels}."
        )
    cond = model_output_cond[..., :latent_channels]
    uncond = model_output_uncond[..., :latent_channels]
    guided = cond + (scale - 1.0) * (cond - uncond)
    return jnp.concatenate(
        [guided.astype(model_output_cond.dtype), model_output_cond[..., latent_channels:]],
        axis=-1,
    )


def guided_model_fn(
    apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    y: jax.Array,
    null_label: int,
    scale,
    latent_channels: int,
) -> ModelFn:
    """Wrap a class-conditional model into a classifier-free-guided `model_fn(x_t, t)`.

    Each call runs `apply_fn(x [2B, ...], t [2B], y [2B])` once on the batch repeated twice,
    with labels `y` in the first half and `null_label` in the second, and combines the halves
    with `classifier_free_guidance`.

    Args:
      apply_fn: the model, for example `functools.partial(model.apply, params)`.
      y: int32 class labels [batch].
      null_label: the label id that means "no class" (the DiT label embedder uses num_classes).
      scale: guidance scale >= 0.
      latent_channels: number of latent channels C of `x_t`.
    """
    _check_guidance_scale(scale)
    chex.assert_rank(y, 1)

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        _check_batch(x_t, t)
        chex.assert_axis_dimension(x_t, 0, y.shape[0])
        x_both = jnp.concatenate([x_t, x_t], axis=0)
        t_both = jnp.concatenate([t, t], axis=0)
        y_both = jnp.concatenate([y, jnp.full_like(y, null_label)], axis=0)
        output = apply_fn(x_both, t_both, y_both)
        output_cond, output_uncond = jnp.split(output, 2, axis=0)
        return classifier_free_guidance(output_cond, output_uncond, scale, latent_channels)

    return model_fn


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def _resolve_timesteps(schedule, num_steps, timesteps, spacing) -> jax.Array:
    """Return the sampler's timestep array from `num_steps` and `spacing`, or check `timesteps`."""
    num_timesteps = schedule.num_timesteps
    if timesteps is None:
        if num_steps is None:
            num_steps = num_timesteps
        return jnp.asarray(timestep_spacing(num_timesteps, num_steps, spacing))
    if num_steps is not None:
        raise ValueError("Pass either num_steps or timesteps, not both.")

    timesteps = jnp.asarray(timesteps) if not isinstance(timesteps, jax.Array) else timesteps
    if timesteps.ndim != 1 or timesteps.shape[0] < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {timesteps.shape}.")
    if not jnp.issubdtype(timesteps.dtype, jnp.integer):
        raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}.")
    # Values can only be checked outside jit, so a traced array is trusted to be valid.
    if not isinstance(timesteps, jax.core.Tracer):
        values = np.asarray(timesteps)
        if values.min() < 0 or values.max() >= num_timesteps or np.any(np.diff(values) >= 0):
            raise ValueError(
                f"timesteps must be strictly decreasing and in [0, {num_timesteps - 1}], "
                f"got {values.tolist()}."
            )
    return timesteps.astype(jnp.int32)


def _model_prediction(model_fn, x_t, t_step, latent_channels, learned_variance):
    t = jnp.full((x_t.shape[0],), t_step, jnp.int32)
    model_output = model_fn(x_t, t).astype(jnp.float32)
    return _split_model_output(model_output, latent_channels, learned_variance)


def _finish(x, trajectory, return_trajectory):
    return (x, trajectory) if return_trajectory else x


def ddim_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int | None = None,
    timesteps: jax.Array | None = None,
    eta=0.0,
    spacing: str = "linspace",
    prediction_type: str = "eps",
    clip_x0: float | None = None,
    return_trajectory: bool = False,
):
    """Sample with DDIM from x_T down to alpha_bar = 1, as one `lax.scan` over the timesteps.

    Give either `num_steps` (with `spacing`, see `timestep_spacing`) or an explicit `timesteps`
    array. Called outside jit, each call traces and compiles the loop again. Under `jax.jit`,
    pass `timesteps` as an argument so that every spacing with the same number of steps reuses
    one compilation, for example:

        @jax.jit
        def sample(variables, x_T, key, y, timesteps):
            apply_fn = lambda x, t, labels: model.apply(variables, x, t, labels)
            model_fn = guided_model_fn(apply_fn, y, num_classes, 4.0, x_T.shape[-1])
            return ddim_sample(model_fn, schedule, x_T, key, timesteps=timesteps)

    The model's variance channels, if any, are ignored. Step i scales noise from
    `jax.random.fold_in(key, i)` by its sigma, which is 0 for eta = 0.

    Args:
      model_fn: `model_fn(x_t [B, H, W, C], t int32 [B])` returning [B, H, W, C] or 2C channels.
      schedule: the diffusion constants.
      x_T: starting noise [batch, height, width, C].
      key: PRNG key.
      num_steps: number of sampler steps in [1, T]; defaults to T when `timesteps` is None.
      timesteps: int32 [S], strictly decreasing, used instead of `num_steps` and `spacing`.
      eta: DDIM noise scale; 0 is deterministic.
      spacing: 'leading', 'trailing' or 'linspace'.
      prediction_type: what the model predicts: 'eps', 'v' or 'x0'.
      clip_x0: if set, clip predicted x_0 to [-clip_x0, clip_x0] and recompute eps from it.
      return_trajectory: also return x after every step, [S, batch, height, width, C].

    Returns:
      x_0 [batch, height, width, C], or (x_0, trajectory) when `return_trajectory`.
    """
    _check_prediction_type(prediction_type)
    timesteps = _resolve_timesteps(schedule, num_steps, timesteps, spacing)
    latent_channels = x_T.shape[-1]
    alpha_bar_t, alpha_bar_prev = alpha_bar_pairs(schedule, timesteps)
    step_indices = jnp.arange(timesteps.shape[0])
    # A concrete eta of 0 needs no noise, which saves drawing it at every step.
    add_noise = isinstance(eta, jax.core.Tracer) or bool(np.any(np.asarray(eta) != 0))

    def step(x, inputs):
        t_step, a_t, a_prev, index = inputs
        prediction, _ = _model_prediction(model_fn, x, t_step, latent_channels, False)
        sqrt_a, sqrt_one_minus_a = jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t)
        x0_pred, eps_pred = _x0_and_eps(x, prediction, sqrt_a, sqrt_one_minus_a, prediction_type)
        if clip_x0 is not None:
            x0_pred = jnp.clip(x0_pred, -clip_x0, clip_x0)
            eps_pred = (x - sqrt_a * x0_pred) / sqrt_one_minus_a
        noise = None
        if add_noise:
            noise = jax.random.normal(jax.random.fold_in(key, index), x.shape, jnp.float32)
        x_prev = _ddim_update(x0_pred, eps_pred, a_t, a_prev, eta, noise).astype(x.dtype)
        return x_prev, (x_prev if return_trajectory else None)

    x_0, trajectory = jax.lax.scan(
        step, x_T, (timesteps, alpha_bar_t, alpha_bar_prev, step_indices)
    )
    return _finish(x_0, trajectory, return_trajectory)


def ddpm_sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int | None = None,
    timesteps: jax.Array | None = None,
    spacing: str = "linspace",
    prediction_type: str = "eps",
    learned_variance: bool = False,
    fixed_variance: str = "large",
    clip_x0: float | None = None,
    return_trajectory: bool = False,
):
    """Sample with ancestral DDPM steps from x_T down to alpha_bar = 1, as one `lax.scan`.

    With fewer steps than the schedule, each step uses the respaced beta
    1 - alpha_bar_t / alpha_bar_prev in place of beta_t for its posterior mean and variance, so
    the full schedule (`num_steps=None`) reproduces the original chain. The last step returns
    the posterior mean without noise. Step i draws noise from `jax.random.fold_in(key, i)`.

    Args:
      model_fn, schedule, x_T, key, num_steps, timesteps, spacing, prediction_type, clip_x0,
      return_trajectory: as in `ddim_sample`; `num_steps` defaults to every timestep.
      learned_variance: the model returns 2C channels and the last C set the log variance
        between the clipped posterior variance and the respaced beta.
      fixed_variance: without learned variance, 'large' uses the respaced beta (the DiT
        default) and 'small' the posterior variance.

    Returns:
      x_0 [batch, height, width, C], or (x_0, trajectory) when `return_trajectory`.
    """
    _check_prediction_type(prediction_type)
    if fixed_variance not in FIXED_VARIANCES:
        raise ValueError(
            f"Unknown fixed_variance {fixed_variance!r}; expected one of {FIXED_VARIANCES}."
        )
    timesteps = _resolve_timesteps(schedule, num_steps, timesteps, spacing)
    latent_channels = x_T.shape[-1]
    num_sampler_steps = timesteps.shape[0]

    alpha_bar_t, alpha_bar_prev = alpha_bar_pairs(schedule, timesteps)
    betas = 1.0 - alpha_bar_t / alpha_bar_prev
    coef1 = betas * jnp.sqrt(alpha_bar_prev) / (1.0 - alpha_bar_t)
    coef2 = (1.0 - alpha_bar_prev) * jnp.sqrt(1.0 - betas) / (1.0 - alpha_bar_t)
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    # The last step's posterior variance is 0. As in the schedule, its log takes the value of the
    # next-to-last step (or its beta when there is only one step). That step adds no noise.
    last_fallback = posterior_variance[-2] if num_sampler_steps > 1 else betas[-1]
    posterior_variance_clipped = posterior_variance.at[-1].set(last_fallback)
    min_log = jnp.log(posterior_variance_clipped)
    max_log = jnp.log(betas)
    fixed_log_variance = max_log if fixed_variance == "large" else min_log
    is_last = jnp.arange(num_sampler_steps) == num_sampler_steps - 1
    step_indices = jnp.arange(num_sampler_steps)

    def step(x, inputs):
        t_step, a_t, c1, c2, low, high, fixed, last, index = inputs
        prediction, variance_values = _model_prediction(
            model_fn, x, t_step, latent_channels, learned_variance
        )
        x0_pred, _ = _x0_and_eps(x, prediction, jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t), prediction_type)
        if clip_x0 is not None:
            x0_pred = jnp.clip(x0_pred, -clip_x0, clip_x0)
        mean = c1 * x0_pred + c2 * x

        if learned_variance:
            fraction = (variance_values + 1.0) / 2.0
            log_variance = fraction * high + (1.0 - fraction) * low
        else:
            log_variance = fixed
        noise = jax.random.normal(jax.random.fold_in(key, index), x.shape, jnp.float32)
        noise_scale = jnp.where(last, 0.0, jnp.exp(0.5 * log_variance))
        x_prev = (mean + noise_scale * noise).astype(x.dtype)
        return x_prev, (x_prev if return_trajectory else None)

    inputs = (
        timesteps,
        alpha_bar_t,
        coef1,
        coef2,
        min_log,
        max_log,
        fixed_log_variance,
        is_last,
        step_indices,
    )
    x_0, trajectory = jax.lax.scan(step, x_T, inputs)
    return _finish(x_0, trajectory, return_trajectory)
