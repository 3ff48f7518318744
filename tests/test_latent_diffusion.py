"""Latent diffusion: latent statistics, batches, the DiT train step and sampling arguments."""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import dit_mnist
from vqdiff_jax import latent_diffusion, parallel
from vqdiff_jax import rng as rng_lib
from vqdiff_jax.train_state import TrainState

LATENT_SHAPE = (4, 4, 3)
NUM_CLASSES = 10


def _config():
    config = dit_mnist.get_config("tiny")
    config.diffusion.num_timesteps = 100
    # The numpy references below assume a linear schedule and eps-prediction.
    config.diffusion.beta_schedule = "linear"
    config.diffusion.prediction_type = "eps"
    return config


def _random_like(shapes, rng):
    return jax.tree.map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _state(model, tx, seed=0):
    """A DiT train state in the structure of `init_state`, with numpy random values.

    Random values replace the zero-initialised adaLN and output layers, so every
    parameter gets a gradient, and `ema_params` differ from `params`.
    """
    shapes = jax.eval_shape(
        lambda: latent_diffusion.init_state(model, tx, jax.random.key(0), LATENT_SHAPE))
    rng = np.random.default_rng(seed)
    params = _random_like(shapes.params, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=_random_like(shapes.params, rng))


def _batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return {"latent": rng.standard_normal((batch_size, *LATENT_SHAPE)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)}


# ---------------------------------------------------------------------------
# Latent statistics and normalisation.
# ---------------------------------------------------------------------------


def test_latent_statistics_numpy():
    rng = np.random.default_rng(0)
    latents = rng.normal([1.0, -2.0, 0.5], [0.5, 3.0, 1.0], size=(20, 3, 3, 3))
    stats = latent_diffusion.latent_statistics(latents.astype(np.float32))
    flat = latents.reshape(-1, 3)
    np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], flat.std(0), rtol=1e-5)


def test_latent_statistics_constant_channel():
    latents = np.zeros((4, 2, 2, 2), np.float32)
    latents[..., 1] = np.arange(16).reshape(4, 2, 2)
    stats = latent_diffusion.latent_statistics(latents)
    assert stats["std"][0] == pytest.approx(1e-6)
    assert np.all(np.isfinite(latent_diffusion.normalize(latents, stats)))


def test_normalize_round_trip():
    rng = np.random.default_rng(1)
    latents = rng.normal(3.0, 2.0, size=(10, 4, 4, 3)).astype(np.float32)
    stats = latent_diffusion.latent_statistics(latents)
    normalized = np.asarray(latent_diffusion.normalize(latents, stats))

    np.testing.assert_allclose(normalized.reshape(-1, 3).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.reshape(-1, 3).std(0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(latent_diffusion.denormalize(normalized, stats), latents,
                               rtol=1e-5, atol=1e-5)


def test_latents_to_codes_recovers_codes():
    rng = np.random.default_rng(2)
    codebook = rng.normal(5.0, 3.0, size=(16, 3)).astype(np.float32)
    codes = rng.integers(0, 16, size=(6, 4, 4))
    z_q = codebook[codes]
    stats = latent_diffusion.latent_statistics(z_q)
    noisy = np.asarray(latent_diffusion.normalize(z_q, stats)) + 1e-3 * rng.standard_normal(
        z_q.shape)
    np.testing.assert_array_equal(
        latent_diffusion.latents_to_codes(noisy.astype(np.float32), stats, codebook), codes)


# ---------------------------------------------------------------------------
# LatentBatches.
# ---------------------------------------------------------------------------


def _latent_batches(seed=0, start_step=0, num_examples=10, batch_size=4):
    latents = np.arange(num_examples, dtype=np.float32).reshape(num_examples, 1, 1, 1)
    labels = np.arange(num_examples, dtype=np.int32)
    return latent_diffusion.LatentBatches(latents, labels, batch_size=batch_size, seed=seed,
                                          start_step=start_step)


def _take(batches, num_steps):
    return [next(batches)["label"] for _ in range(num_steps)]


def test_batches_deterministic():
    first, second = _take(_latent_batches(seed=3), 6), _take(_latent_batches(seed=3), 6)
    other_seed = _take(_latent_batches(seed=4), 6)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other_seed)


def test_batches_match_latents():
    batch = next(_latent_batches())
    assert batch["latent"].shape == (4, 1, 1, 1)
    np.testing.assert_array_equal(batch["latent"][:, 0, 0, 0], batch["label"])


def test_batches_epochs():
    # 10 examples, batches of 4: two batches per epoch, the last 2 examples left out.
    batches = _take(_latent_batches(seed=0), 8)
    epochs = [np.concatenate(batches[i:i + 2]) for i in range(0, 8, 2)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 8
    assert len({tuple(epoch) for epoch in epochs}) == 4


def test_batches_resume():
    uninterrupted = _take(_latent_batches(seed=5), 7)
    resumed = _take(_latent_batches(seed=5, start_step=4), 3)
    np.testing.assert_array_equal(resumed, uninterrupted[4:])


def test_batches_too_few_latents():
    with pytest.raises(ValueError, match=r"batch_size 16 is larger than the 10 training latents"):
        _latent_batches(batch_size=16)


# ---------------------------------------------------------------------------
# Model and sampling arguments.
# ---------------------------------------------------------------------------


def test_patch_size_not_dividing_latent():
    config = _config()
    config.model.patch_size = 2
    model = latent_diffusion.make_dit(config.model, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"height 7 and width 7 must both be divisible by "
                                         r"patch_size 2"):
        jax.eval_shape(
            lambda: latent_diffusion.init_state(model, optax.sgd(0.1), jax.random.key(0),
                                                (7, 7, 4)))


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance_scale": -1.0}, r"guidance_scale must be in \[0, 100\].*got -1.0"),
    ({"guidance_scale": 101.0}, r"guidance_scale must be in \[0, 100\].*got 101.0"),
    ({"num_steps": 0}, r"must be in \[1, 100\].*got 0"),
    ({"num_steps": 101}, r"must be in \[1, 100\].*got 101"),
    ({"sampler": "euler"}, r"sampler must be one of \('ddim', 'ddpm'\), got 'euler'"),
    ({"per_class": 0}, r"per_class \(images per class\) must be >= 1, got 0"),
])
def test_sampling_args_out_of_range(kwargs, message):
    args = {"guidance_scale": 4.0, "num_steps": 10, "num_timesteps": 100, "sampler": "ddim"}
    with pytest.raises(ValueError, match=message):
        latent_diffusion.check_sampling_args(**{**args, **kwargs})


def test_sampling_args_bounds_accepted():
    for scale, steps in [(0.0, 1), (100.0, 100)]:
        latent_diffusion.check_sampling_args(
            guidance_scale=scale, num_steps=steps, num_timesteps=100, sampler="ddpm")


# ---------------------------------------------------------------------------
# The DiT train step.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sgd_step():
    """One jitted SGD step (ema_decay 0.9) from a random state at step 0, and its result."""
    config = _config()
    model = latent_diffusion.make_dit(config.model, NUM_CLASSES)
    schedule = latent_diffusion.make_schedule(config.diffusion)
    tx = optax.sgd(0.1)
    state = _state(model, tx)
    batch = _batch(8)
    step_fn = jax.jit(latent_diffusion.make_train_step(
        model, schedule, config.diffusion, tx, seed=config.seed, ema_decay=0.9))
    new_state, metrics = step_fn(state, batch)
    return types.SimpleNamespace(config=config, model=model, step_fn=step_fn, state=state,
                                 new_state=new_state, metrics=metrics, batch=batch)


def _expected_ema(ema_params, params, decay):
    return jax.tree.map(
        lambda e, p: decay * np.asarray(e, np.float64) + (1 - decay) * np.asarray(p, np.float64),
        ema_params, params)


def test_weight_ema_warmup(sgd_step):
    # At step 0 the warm-up decay (1 + 0) / (10 + 0) = 0.1 is below ema_decay = 0.9.
    run = sgd_step
    expected = _expected_ema(run.state.ema_params, run.new_state.params, 0.1)
    chex.assert_trees_all_close(run.new_state.ema_params, expected, rtol=1e-5, atol=1e-7)


def test_weight_ema_decay(sgd_step):
    # At step 200 the warm-up decay 201 / 210 exceeds ema_decay, which then applies.
    run = sgd_step
    later = run.state.replace(step=jnp.asarray(200, jnp.int32))
    new_state, _ = run.step_fn(later, run.batch)
    expected = _expected_ema(run.state.ema_params, new_state.params, 0.9)
    chex.assert_trees_all_close(new_state.ema_params, expected, rtol=1e-5, atol=1e-7)


def test_dit_step_gradient(sgd_step):
    # Reference: noise from the step's keys, x_t in numpy, the eps-prediction MSE.
    run = sgd_step
    x_0, y = run.batch["latent"], run.batch["label"]
    diffusion_config = run.config.diffusion
    key = rng_lib.step_key(run.config.seed, 0)
    t = np.asarray(jax.random.randint(rng_lib.purpose_key(key, "time"), (8,), 0, 100))
    eps = np.asarray(jax.random.normal(rng_lib.purpose_key(key, "noise"), x_0.shape))
    betas = np.linspace(diffusion_config.beta_start, diffusion_config.beta_end, 100)
    alpha_bar = np.cumprod(1.0 - betas)[t][:, None, None, None]
    x_t = (np.sqrt(alpha_bar) * x_0 + np.sqrt(1.0 - alpha_bar) * eps).astype(np.float32)

    def reference_loss(params):
        eps_pred = run.model.apply({"params": params}, x_t, t, y, train=True,
                                   rngs={"label_drop": rng_lib.purpose_key(key, "label_drop")})
        return jnp.mean((eps_pred - eps) ** 2)

    loss, grads = jax.jit(jax.value_and_grad(reference_loss))(run.state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, run.state.params, grads)

    np.testing.assert_allclose(run.metrics["train/loss"], loss, rtol=1e-5)
    chex.assert_trees_all_close(run.new_state.params, expected, rtol=1e-4, atol=1e-6)
    assert int(run.new_state.step) == 1


def _run_steps(num_devices, num_steps=3):
    """Run the jitted DiT step on a `data` mesh of `num_devices`; return the final state."""
    config = _config()
    mesh = parallel.make_mesh(num_devices)
    model = latent_diffusion.make_dit(config.model, NUM_CLASSES)
    schedule = latent_diffusion.make_schedule(config.diffusion)
    # Adam would turn the rounding noise in gradients that are zero in exact arithmetic
    # (the attention key bias) into updates of size lr, so the check uses momentum SGD.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    state = _state(model, tx)
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    state = jax.device_put(state, state_sharding)
    step_fn = chex.assert_max_traces(latent_diffusion.make_train_step(
        model, schedule, config.diffusion, tx, seed=config.seed, ema_decay=0.5), n=1)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0)
    for i in range(num_steps):
        state, _ = train_step(state, jax.device_put(_batch(16, seed=i),
                                                    parallel.batch_sharded(mesh)))
    chex.clear_trace_counter()
    return jax.device_get(state)


def test_dit_step_devices_agree():
    # Timesteps, noise and label drops are drawn for the global batch, so the device
    # count does not change them.
    one = _run_steps(1)
    eight = _run_steps(8)
    assert int(one.step) == int(eight.step) == 3
    chex.assert_trees_all_close(one.params, eight.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(one.ema_params, eight.ema_params, rtol=1e-4, atol=1e-5)
