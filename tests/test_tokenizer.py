"""Tokenizer train step: gradients, the EMA codebook, compilation and device-count invariance."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import tokenizer_mnist
from vqdiff_jax import parallel, quantizer, tokenizer
from vqdiff_jax.models import vqvae
from vqdiff_jax.train_state import TrainState, make_optimizer

IMAGE_SHAPE = (16, 16, 1)


def _config(**vq_overrides):
    """The tiny tokenizer config with one downsampling (f2) to keep compilation short."""
    config = tokenizer_mnist.get_config("tiny")
    config.model.channel_mult = (1, 2)
    config.vq.update(vq_overrides)
    return config


def _model(config):
    return vqvae.make_vqvae(config.model, image_channels=IMAGE_SHAPE[-1])


def _images(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(batch_size, *IMAGE_SHAPE)).astype(np.float32)


def _state(model, vq_config, tx, seed=0):
    """A train state in the structure of `tokenizer.init_state`, with numpy random values.

    Compiling the random initialisers costs seconds of CPU time per test, and these
    tests need a state of the right structure, not the initialisers' values.
    """
    shapes = jax.eval_shape(
        lambda: tokenizer.init_state(model, vq_config, tx, jax.random.key(0), IMAGE_SHAPE))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes.params)
    codebook = params.get("codebook")
    if codebook is None:
        codebook = rng.standard_normal(shapes.vq.codebook.shape).astype(np.float32)
    vq = quantizer.VQState(
        codebook=codebook, cluster_size=np.ones(vq_config.num_codes, np.float32),
        embed_sum=codebook)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      vq=vq)


def _encode(model, params, images):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=vqvae.VQVAE.encode))(
        params["model"], images)


def _nearest_codes_numpy(z_e, codebook):
    """Nearest codes [N] of z_e [N, D] by float64 squared distance."""
    z_e, codebook = np.asarray(z_e, np.float64), np.asarray(codebook, np.float64)
    distances = ((z_e[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # [N, K]
    return distances.argmin(-1)


# ---------------------------------------------------------------------------
# Configuration and state structure.
# ---------------------------------------------------------------------------


def test_num_codes_zero_raises():
    config = _config(num_codes=0)
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"vq.num_codes .* must be >= 1, got 0"):
        tokenizer.init_state(_model(config), config.vq, tx, jax.random.key(0), IMAGE_SHAPE)


def test_bad_vq_fields_raise():
    for field, value, message in [("codebook", "kmeans", r"vq.codebook must be one of"),
                                  ("ema_decay", 1.0, r"vq.ema_decay must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            tokenizer.check_vq_config(_config(**{field: value}).vq)


def test_ema_codebook_outside_optimizer():
    config = _config(codebook="ema")
    model, tx = _model(config), make_optimizer(config.optimizer, 10)
    state = jax.eval_shape(
        lambda: tokenizer.init_state(model, config.vq, tx, jax.random.key(0), IMAGE_SHAPE))
    adam_mu = optax.tree_utils.tree_get(state.opt_state, "mu")

    assert set(state.params) == {"model"}
    assert jax.tree.structure(adam_mu) == jax.tree.structure(state.params)
    assert state.vq.codebook.shape == (config.vq.num_codes, model.code_dim)


def test_learned_codebook_in_optimizer():
    config = _config(codebook="learned")
    model, tx = _model(config), make_optimizer(config.optimizer, 10)
    state = jax.eval_shape(
        lambda: tokenizer.init_state(model, config.vq, tx, jax.random.key(0), IMAGE_SHAPE))
    adam_mu = optax.tree_utils.tree_get(state.opt_state, "mu")

    assert set(state.params) == {"model", "codebook"}
    assert adam_mu["codebook"].shape == (config.vq.num_codes, model.code_dim)


# ---------------------------------------------------------------------------
# One train step against numpy and straight-through references.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ema_step_fn():
    """(config, model, jitted step) with an EMA codebook, SGD and restarts every 5 steps."""
    config = _config(codebook="ema", restart_every=5)
    model, tx = _model(config), optax.sgd(0.1)
    return config, model, tx, jax.jit(tokenizer.make_train_step(model, config.vq, tx, seed=0))


@pytest.fixture(scope="module")
def ema_step(ema_step_fn):
    """(config, model, state before, state after, metrics, images) of step 1, no restart."""
    config, model, tx, step_fn = ema_step_fn
    state = _state(model, config.vq, tx).replace(step=jnp.ones((), jnp.int32))
    images = _images(8)
    new_state, metrics = step_fn(state, {"image": images})
    assert int(metrics["vq/restarted_codes"]) == 0
    return config, model, state, new_state, metrics, images


def test_ema_codebook_update(ema_step):
    config, model, state, new_state, _, images = ema_step
    z_e = np.asarray(_encode(model, state.params, images), np.float64).reshape(-1, 4)
    codebook = np.asarray(state.vq.codebook, np.float64)
    codes = _nearest_codes_numpy(z_e, codebook)
    num_codes, decay, eps = config.vq.num_codes, config.vq.ema_decay, config.vq.ema_eps

    counts = np.bincount(codes, minlength=num_codes)
    sums = np.zeros_like(codebook)
    np.add.at(sums, codes, z_e)
    cluster_size = decay * 1.0 + (1 - decay) * counts
    embed_sum = decay * codebook + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total

    np.testing.assert_allclose(new_state.vq.cluster_size, cluster_size, rtol=1e-6)
    np.testing.assert_allclose(new_state.vq.embed_sum, embed_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        new_state.vq.codebook, embed_sum / smoothed[:, None], rtol=1e-5, atol=1e-6)


def test_straight_through_gradient(ema_step):
    # Reference: the classic form z_e + stop_gradient(z_q - z_e), codes from numpy.
    config, model, state, new_state, metrics, images = ema_step
    beta, lr = config.vq.commitment_weight, 0.1
    z_e = _encode(model, state.params, images)
    codes = _nearest_codes_numpy(np.asarray(z_e).reshape(-1, 4), state.vq.codebook)
    z_q = jnp.asarray(np.asarray(state.vq.codebook)[codes].reshape(z_e.shape))

    def reference_loss(model_params):
        z = model.apply({"params": model_params}, images, method=vqvae.VQVAE.encode)
        z_st = z + jax.lax.stop_gradient(z_q - z)
        recon = model.apply({"params": model_params}, z_st, method=vqvae.VQVAE.decode)
        return jnp.mean((recon - images) ** 2) + beta * jnp.mean((z - z_q) ** 2)

    loss, grads = jax.jit(jax.value_and_grad(reference_loss))(state.params["model"])
    expected = jax.tree.map(lambda p, g: p - lr * g, state.params["model"], grads)

    np.testing.assert_allclose(metrics["train/loss"], loss, rtol=1e-5)
    chex.assert_trees_all_close(new_state.params["model"], expected, rtol=1e-4, atol=1e-6)
    assert float(metrics["train/grad_norm"]) > 0


def test_learned_codebook_gradient():
    # codebook_loss = mean((sg(z_e) - z_q)^2) over N * D elements, so code k moves by
    # -lr * 2 / (N * D) * sum over its vectors of (c_k - z_e). The commitment and
    # reconstruction terms send no gradient to the codebook.
    config = _config(codebook="learned", restart_every=0)
    model, lr = _model(config), 0.1
    tx = optax.sgd(lr)
    state = _state(model, config.vq, tx, seed=1)
    images = _images(8, seed=1)
    new_state, _ = jax.jit(tokenizer.make_train_step(model, config.vq, tx, seed=0))(
        state, {"image": images})

    z_e = np.asarray(_encode(model, state.params, images), np.float64).reshape(-1, 4)
    codebook = np.asarray(state.params["codebook"], np.float64)
    codes = _nearest_codes_numpy(z_e, codebook)
    grad = np.zeros_like(codebook)
    np.add.at(grad, codes, 2.0 * (codebook[codes] - z_e) / z_e.size)

    np.testing.assert_allclose(
        new_state.params["codebook"], codebook - lr * grad, rtol=1e-5, atol=1e-6)
    assert np.any(grad != 0)


def test_restart_fills_codebook_at_step_zero(ema_step_fn):
    # Step 0 treats every code as dead and restarts it from encoder outputs of the batch.
    config, model, tx, step_fn = ema_step_fn
    state = _state(model, config.vq, tx, seed=2)
    images = _images(8, seed=2)
    new_state, metrics = step_fn(state, {"image": images})

    z_e = np.asarray(_encode(model, state.params, images)).reshape(-1, 4)
    distances = ((np.asarray(new_state.vq.codebook)[:, None] - z_e[None]) ** 2).sum(-1)
    assert int(metrics["vq/restarted_codes"]) == config.vq.num_codes
    np.testing.assert_allclose(distances.min(axis=1), 0.0, atol=1e-8)
    np.testing.assert_array_equal(new_state.vq.cluster_size, 1.0)


# ---------------------------------------------------------------------------
# Compilation and 1-device versus 8-device agreement.
# ---------------------------------------------------------------------------


def _run_steps(config, num_devices: int, num_steps: int = 3):
    """Run the jitted train step on a `data` mesh of `num_devices`; return the final state."""
    mesh = parallel.make_mesh(num_devices)
    model = _model(config)
    # Adam would turn rounding noise in near-zero gradients into updates of size lr, so
    # the check uses momentum SGD, with clipping to exercise the global gradient norm.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    state = _state(model, config.vq, tx)
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    state = jax.device_put(state, state_sharding)
    step_fn = chex.assert_max_traces(
        tokenizer.make_train_step(model, config.vq, tx, seed=config.seed), n=1)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=0)
    for i in range(num_steps):
        batch = jax.device_put({"image": _images(16, seed=i)}, parallel.batch_sharded(mesh))
        state, _ = train_step(state, batch)
    chex.clear_trace_counter()
    return jax.device_get(state)


def test_step_devices_agree():
    # Steps 0 and 2 restart dead codes (restart_every=2), step 1 does not.
    config = _config(codebook="ema", restart_every=2)
    one = _run_steps(config, 1)
    eight = _run_steps(config, 8)

    assert int(one.step) == int(eight.step) == 3
    chex.assert_trees_all_close(one.params, eight.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(one.vq, eight.vq, rtol=1e-4, atol=1e-5)


def test_step_recompiles_raises():
    # The trace counter is the check behind test_step_devices_agree: a second trace of
    # the same step function raises.
    config = _config(codebook="ema", restart_every=0)
    model, tx = _model(config), optax.sgd(0.1)
    step_fn = chex.assert_max_traces(
        tokenizer.make_train_step(model, config.vq, tx, seed=0), n=1)
    state = _state(model, config.vq, tx)
    try:
        jax.eval_shape(step_fn, state, {"image": _images(8)})
        with pytest.raises(AssertionError, match="traced"):
            jax.eval_shape(step_fn, state, {"image": _images(16)})
    finally:
        chex.clear_trace_counter()


# ---------------------------------------------------------------------------
# Evaluation metrics.
# ---------------------------------------------------------------------------


def test_psnr_hand_value():
    # Pixels at -1 map to 0, a reconstruction at 0 maps to 0.5: mse 0.25, PSNR 10*log10(4).
    x = -np.ones((2, 4, 4, 1), np.float32)
    recon = np.zeros_like(x)
    recon[1] = 5.0  # Clipped to 1 before comparison: mse 1, PSNR 0.
    np.testing.assert_allclose(tokenizer.psnr_per_image(x, recon), [10 * np.log10(4.0), 0.0],
                               rtol=1e-6, atol=1e-6)


def test_evaluate_matches_numpy(ema_step):
    config, model, _, new_state, _, images = ema_step
    metrics, recon = tokenizer.evaluate(
        model, new_state, images, batch_size=3, num_codes=config.vq.num_codes)

    z_e = np.asarray(_encode(model, new_state.params, images)).reshape(-1, 4)
    counts = np.bincount(_nearest_codes_numpy(z_e, new_state.vq.codebook),
                         minlength=config.vq.num_codes)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    x01, rec01 = (images + 1) / 2, np.clip((recon + 1) / 2, 0, 1)
    psnr = 10 * np.log10(1 / ((x01 - rec01) ** 2).mean(axis=(1, 2, 3)))

    assert recon.shape == images.shape
    assert metrics["code_counts"] == counts.tolist()
    assert metrics["codes_used_fraction"] == pytest.approx((counts > 0).mean())
    assert metrics["perplexity"] == pytest.approx(np.exp(-(nonzero * np.log(nonzero)).sum()),
                                                  rel=1e-5)
    assert metrics["psnr"] == pytest.approx(psnr.mean(), rel=1e-5)
