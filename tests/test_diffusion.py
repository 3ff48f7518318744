"""Tests for vqdiff_jax.diffusion against float64 numpy, plain Python math and closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vqdiff_jax import diffusion

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ALPHA_BAR = np.cumprod(1.0 - BETAS)
SCHEDULE = diffusion.make_schedule(diffusion.linear_beta_schedule())
SHAPE = (2, 4, 4, 3)


def _normal(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _b(values, ndim=4):
    """Reshape a per-example vector [B] to [B, 1, 1, 1]."""
    return np.asarray(values).reshape((-1,) + (1,) * (ndim - 1))


def _oracle_model(x_0, prediction_type):
    """Model that returns the exact target for a known x_0, computed from the numpy alpha_bar."""
    alpha_bar = jnp.asarray(ALPHA_BAR, jnp.float32)
    x_0 = jnp.asarray(x_0)

    def model_fn(x_t, t):
        a = alpha_bar[t].reshape((-1, 1, 1, 1))
        eps = (x_t - jnp.sqrt(a) * x_0) / jnp.sqrt(1.0 - a)
        if prediction_type == "eps":
            return eps
        if prediction_type == "x0":
            return jnp.broadcast_to(x_0, x_t.shape)
        return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x_0

    return model_fn


def _zero_model(x_t, t):
    del t
    return jnp.zeros_like(x_t)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def test_linear_schedule_values():
    betas = diffusion.linear_beta_schedule()
    assert betas.dtype == np.float64
    assert betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-9)


def test_cosine_schedule_closed_form():
    s = 0.008
    betas = diffusion.cosine_beta_schedule(T, s=s, max_beta=0.999)
    assert betas.dtype == np.float64

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array([f((t + 1) / T) / f(0.0) for t in range(T)])
    # Only the last beta reaches the cap, because alpha_bar(1) = 0.
    np.testing.assert_allclose(np.cumprod(1.0 - betas)[:-1], expected[:-1], rtol=1e-9)
    assert betas[-1] == 0.999
    assert np.all(betas[:-1] < 0.999)
    assert np.all(betas > 0)


def test_make_schedule_matches_python():
    betas = [0.1, 0.2, 0.3, 0.4]
    schedule = diffusion.make_schedule(betas)
    alpha_bar, alpha_bar_prev = [], []
    product = 1.0
    for beta in betas:
        alpha_bar_prev.append(product)
        product *= 1.0 - beta
        alpha_bar.append(product)

    for name, value in vars(schedule).items():
        assert value.dtype == jnp.float32, name
        assert value.shape == (4,), name
    assert schedule.num_timesteps == 4
    np.testing.assert_allclose(schedule.alphas_cumprod, alpha_bar, rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod_prev, alpha_bar_prev, rtol=1e-6)
    np.testing.assert_allclose(schedule.sqrt_alphas_cumprod, np.sqrt(alpha_bar), rtol=1e-6)
    np.testing.assert_allclose(
        schedule.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - np.array(alpha_bar)), rtol=1e-6
    )
    np.testing.assert_allclose(
        schedule.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / np.array(alpha_bar) - 1), rtol=1e-6
    )

    # Posterior q(x_{t-1} | x_t, x_0) by conditioning the Gaussian pair (x_{t-1}, x_t) on x_t:
    # x_{t-1} ~ N(sqrt(ab_prev) x_0, 1 - ab_prev) and x_t = sqrt(1 - beta) x_{t-1} + noise.
    for t in range(1, 4):
        var_prev = 1.0 - alpha_bar_prev[t]
        var_t = 1.0 - alpha_bar[t]
        covariance = math.sqrt(1.0 - betas[t]) * var_prev
        gain = covariance / var_t
        coef_x0 = math.sqrt(alpha_bar_prev[t]) - gain * math.sqrt(alpha_bar[t])
        variance = var_prev - covariance * covariance / var_t
        assert float(schedule.posterior_mean_coef1[t]) == pytest.approx(coef_x0, rel=1e-5)
        assert float(schedule.posterior_mean_coef2[t]) == pytest.approx(gain, rel=1e-5)
        assert float(schedule.posterior_variance[t]) == pytest.approx(variance, rel=1e-5)
        assert float(schedule.posterior_log_variance_clipped[t]) == pytest.approx(
            math.log(variance), rel=1e-5
        )
    assert float(schedule.posterior_variance[0]) == 0.0
    assert float(schedule.posterior_log_variance_clipped[0]) == pytest.approx(
        float(schedule.posterior_log_variance_clipped[1]), rel=1e-6
    )


@pytest.mark.parametrize(
    "betas",
    [np.full((3, 2), 0.1), [0.1], [0.1, 0.0, 0.2], [0.1, 1.0]],
    ids=["2d", "one_step", "zero", "one"],
)
def test_make_schedule_rejects_bad_betas(betas):
    with pytest.raises(ValueError):
        diffusion.make_schedule(betas)


# ----------------------------------------------------------------------------------------------
# Forward process, targets and loss
# ----------------------------------------------------------------------------------------------


def test_q_sample_formula():
    x_0, eps = _normal(0), _normal(1)
    t = np.array([0, 731], np.int32)
    x_t = diffusion.q_sample(SCHEDULE, x_0, t, eps)
    a = _b(ALPHA_BAR[t])
    np.testing.assert_allclose(x_t, np.sqrt(a) * x_0 + np.sqrt(1 - a) * eps, rtol=1e-5, atol=1e-6)


def test_q_sample_statistics():
    n = 20000
    t = np.full((n,), 300, np.int32)
    x_0 = np.full((n, 1, 1, 1), 1.5, np.float32)
    eps = jax.random.normal(jax.random.key(0), x_0.shape)
    x_t = np.asarray(diffusion.q_sample(SCHEDULE, x_0, t, eps))
    a = ALPHA_BAR[300]
    # The standard error is 1/sqrt(n) ~ 0.007 of the standard deviation. Allow about 4 of them.
    assert x_t.mean() == pytest.approx(math.sqrt(a) * 1.5, abs=0.03)
    assert x_t.std() == pytest.approx(math.sqrt(1 - a), rel=0.03)


def test_v_target_identity():
    x_0, eps = _normal(2), _normal(3)
    t = np.array([10, 950], np.int32)
    x_t = np.asarray(diffusion.q_sample(SCHEDULE, x_0, t, eps))
    v = np.asarray(diffusion.training_target(SCHEDULE, x_0, t, eps, "v"))
    a = _b(ALPHA_BAR[t])
    np.testing.assert_allclose(v, np.sqrt(a) * eps - np.sqrt(1 - a) * x_0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sqrt(a) * x_t - np.sqrt(1 - a) * v, x_0, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(1 - a) * x_t + np.sqrt(a) * v, eps, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_predict_x0_and_eps_inverts_target(prediction_type):
    x_0, eps = _normal(4), _normal(5)
    t = np.array([5, 600], np.int32)
    a = _b(ALPHA_BAR[t])
    x_t = (np.sqrt(a) * x_0 + np.sqrt(1 - a) * eps).astype(np.float32)
    target = {"eps": eps, "x0": x_0, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x_0}[prediction_type]
    x0_pred, eps_pred = diffusion.predict_x0_and_eps(
        SCHEDULE, x_t, t, target.astype(np.float32), prediction_type
    )
    # t = 5 has sqrt(alpha_bar) ~ 1 and sqrt(1 - alpha_bar) ~ 0.03, so eps from x_0 is the
    # least accurate direction; 1e-4 still catches any wrong coefficient.
    np.testing.assert_allclose(x0_pred, x_0, atol=1e-4)
    np.testing.assert_allclose(eps_pred, eps, atol=1e-4)


def test_unknown_prediction_type_rejected():
    x_0 = _normal(0)
    t = np.zeros((2,), np.int32)
    with pytest.raises(ValueError, match="prediction_type 'score'"):
        diffusion.training_target(SCHEDULE, x_0, t, x_0, "score")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.predict_x0_and_eps(SCHEDULE, x_0, t, x_0, "score")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.ddim_sample(
            _zero_model, SCHEDULE, x_0, jax.random.key(0), num_steps=2, prediction_type="score"
        )


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_loss_mse_and_gradient(prediction_type):
    x_0, eps, output = _normal(6), _normal(7), _normal(8)
    t = np.array([3, 800], np.int32)
    a = _b(ALPHA_BAR[t])
    x_t = (np.sqrt(a) * x_0 + np.sqrt(1 - a) * eps).astype(np.float32)
    target = {"eps": eps, "x0": x_0, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x_0}[prediction_type]

    def loss_fn(model_output):
        return diffusion.diffusion_loss(
            SCHEDULE,
            model_output,
            x_0,
            x_t,
            t,
            eps,
            prediction_type=prediction_type,
            learned_variance=False,
        )

    terms = loss_fn(output)
    expected = np.mean((output - target) ** 2)
    assert float(terms["mse"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["vlb"]) == 0.0
    grad = jax.grad(lambda o: loss_fn(o)["loss"])(output)
    np.testing.assert_allclose(grad, 2 * (output - target) / output.size, rtol=1e-4, atol=1e-8)


def _numpy_vlb_terms(x_0, x_t, t, prediction, variance_values):
    """Return (L_t per example in bits, model log variance, min_log, true mean, model mean)."""
    a = _b(ALPHA_BAR[t])
    a_prev = _b(np.append(1.0, ALPHA_BAR[:-1])[t])
    beta = _b(BETAS[t])
    posterior_variance = np.append(
        BETAS * (1 - np.append(1.0, ALPHA_BAR[:-1])) / (1 - ALPHA_BAR), []
    )
    min_log = _b(np.log(np.append(posterior_variance[1], posterior_variance[1:]))[t])
    max_log = np.log(beta)
    x0_pred = (x_t - np.sqrt(1 - a) * prediction) / np.sqrt(a)
    coef1 = beta * np.sqrt(a_prev) / (1 - a)
    coef2 = (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
    model_mean = coef1 * x0_pred + coef2 * x_t
    true_mean = coef1 * x_0 + coef2 * x_t
    fraction = (variance_values + 1) / 2
    model_log_var = fraction * max_log + (1 - fraction) * min_log

    kl = 0.5 * (
        -1
        + model_log_var
        - min_log
        + np.exp(min_log - model_log_var)
        + (true_mean - model_mean) ** 2 / np.exp(model_log_var)
    )
    scale = np.exp(0.5 * model_log_var)
    upper = stats.norm.cdf(x_0 + 1 / 255, loc=model_mean, scale=scale)
    lower = stats.norm.cdf(x_0 - 1 / 255, loc=model_mean, scale=scale)
    with np.errstate(divide="ignore"):  # np.where evaluates the unused edge-bin branches too
        log_prob = np.where(
            x_0 < -0.999,
            np.log(upper),
            np.where(x_0 > 0.999, np.log(1 - lower), np.log(upper - lower)),
        )
    per_example = np.where(
        t == 0, -log_prob.mean(axis=(1, 2, 3)), kl.mean(axis=(1, 2, 3))
    ) / math.log(2)
    return per_example, model_log_var, min_log, true_mean, model_mean


def _learned_variance_batch(t):
    rng = np.random.default_rng(9)
    shape = (len(t), 4, 4, 3)
    # x_0 on the 8-bit grid in [-1, 1], including both edge bins.
    x_0 = (rng.integers(0, 256, shape) / 127.5 - 1.0).astype(np.float32)
    x_0[0, 0, 0] = [-1.0, 1.0, 0.0]
    eps = rng.standard_normal(shape).astype(np.float32)
    a = _b(ALPHA_BAR[t])
    x_t = (np.sqrt(a) * x_0 + np.sqrt(1 - a) * eps).astype(np.float32)
    prediction = (eps + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    variance_values = rng.uniform(-1, 1, shape).astype(np.float32)
    return x_0, eps, x_t, prediction, variance_values


def test_loss_vlb_matches_numpy():
    t = np.array([0, 1, 400, 999], np.int32)
    x_0, eps, x_t, prediction, variance_values = _learned_variance_batch(t)
    output = np.concatenate([prediction, variance_values], axis=-1)
    terms = jax.jit(
        lambda o: diffusion.diffusion_loss(
            SCHEDULE, o, x_0, x_t, t, eps, prediction_type="eps", learned_variance=True
        )
    )(output)
    per_example, *_ = _numpy_vlb_terms(x_0, x_t, t, prediction, variance_values)
    mse = np.mean((prediction - eps) ** 2)
    assert float(terms["mse"]) == pytest.approx(mse, rel=1e-5)
    assert float(terms["vlb"]) == pytest.approx(per_example.mean(), rel=1e-4)
    # Weight 1e-3 times T = 1000 adds the bound term unscaled, as the DiT reference does.
    assert float(terms["loss"]) == pytest.approx(mse + per_example.mean(), rel=1e-4)

    terms_weighted = diffusion.diffusion_loss(
        SCHEDULE,
        output,
        x_0,
        x_t,
        t,
        eps,
        prediction_type="eps",
        learned_variance=True,
        vlb_weight=0.5,
    )
    assert float(terms_weighted["loss"]) == pytest.approx(
        mse + 0.5 * T * per_example.mean(), rel=1e-4
    )


def test_loss_vlb_gradients():
    t = np.array([1, 250, 700], np.int32)
    x_0, eps, x_t, prediction, variance_values = _learned_variance_batch(t)
    output = np.concatenate([prediction, variance_values], axis=-1)
    c = x_0.shape[-1]

    def term(name):
        def fn(model_output):
            return diffusion.diffusion_loss(
                SCHEDULE,
                model_output,
                x_0,
                x_t,
                t,
                eps,
                prediction_type="eps",
                learned_variance=True,
            )[name]

        return jax.jit(jax.grad(fn))(output)

    grad_vlb, grad_mse = np.asarray(term("vlb")), np.asarray(term("mse"))
    assert np.all(grad_vlb[..., :c] == 0.0), "the bound must not train the predicted mean"
    assert np.all(grad_mse[..., c:] == 0.0), "the MSE must not train the variance channels"

    # d KL / d model_log_var = 0.5 (1 - exp(lv1 - lv2) - (mu1 - mu2)^2 exp(-lv2)), and
    # d model_log_var / d value = (max_log - min_log) / 2. The mean divides by B * H * W * C.
    _, model_log_var, min_log, true_mean, model_mean = _numpy_vlb_terms(
        x_0, x_t, t, prediction, variance_values
    )
    max_log = np.log(_b(BETAS[t]))
    d_kl = 0.5 * (
        1 - np.exp(min_log - model_log_var) - (true_mean - model_mean) ** 2 / np.exp(model_log_var)
    )
    expected = d_kl * 0.5 * (max_log - min_log) / (x_0.size * math.log(2))
    np.testing.assert_allclose(grad_vlb[..., c:], expected, rtol=2e-3, atol=1e-9)


def test_loss_rejects_wrong_channels():
    x_0, eps = _normal(0), _normal(1)
    t = np.array([1, 2], np.int32)
    with pytest.raises(ValueError, match="needs 2 \\* 3 = 6 channels, got 3"):
        diffusion.diffusion_loss(
            SCHEDULE, x_0, x_0, x_0, t, eps, prediction_type="eps", learned_variance=True
        )
    with pytest.raises(ValueError, match="needs 3 channels"):
        diffusion.diffusion_loss(
            SCHEDULE,
            x_0[..., :2],
            x_0,
            x_0,
            t,
            eps,
            prediction_type="eps",
            learned_variance=False,
        )


# ----------------------------------------------------------------------------------------------
# Timestep spacing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_spacing_ten_steps(mode, expected):
    timesteps = diffusion.timestep_spacing(T, 10, mode)
    assert timesteps.dtype == np.int32
    assert timesteps.tolist() == expected


def test_spacing_linspace_rounds_half_even():
    # linspace(0, 999, 7) has 166.5, 499.5 and 832.5, which round to 166, 500 and 832.
    assert diffusion.timestep_spacing(T, 7, "linspace").tolist() == [
        999,
        832,
        666,
        500,
        333,
        166,
        0,
    ]


@pytest.mark.parametrize("mode", diffusion.SPACING_MODES)
def test_spacing_all_steps(mode):
    timesteps = diffusion.timestep_spacing(T, T, mode)
    assert timesteps.tolist() == list(range(T - 1, -1, -1))
    assert timesteps.max() < T


@pytest.mark.parametrize("mode", diffusion.SPACING_MODES)
def test_spacing_strictly_decreasing_in_range(mode):
    for num_timesteps in (1, 2, 7, 50, 1000):
        for num_steps in sorted({1, 2, 3, num_timesteps // 3, num_timesteps - 1, num_timesteps}):
            if not 1 <= num_steps <= num_timesteps:
                continue
            timesteps = diffusion.timestep_spacing(num_timesteps, num_steps, mode)
            assert timesteps.shape == (num_steps,)
            assert np.all(np.diff(timesteps) < 0), (num_timesteps, num_steps)
            assert timesteps.min() >= 0
            assert timesteps.max() <= num_timesteps - 1


def test_spacing_single_step():
    assert diffusion.timestep_spacing(T, 1, "linspace").tolist() == [999]
    assert diffusion.timestep_spacing(T, 1, "trailing").tolist() == [999]
    # 'leading' keeps its definition and never reaches T - 1 with few steps.
    assert diffusion.timestep_spacing(T, 1, "leading").tolist() == [0]


@pytest.mark.parametrize("num_steps", [0, -3, 1001, 2.5, True])
def test_spacing_rejects_num_steps(num_steps):
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
        diffusion.timestep_spacing(T, num_steps, "linspace")


def test_spacing_rejects_unknown_mode():
    with pytest.raises(ValueError, match="Unknown spacing 'uniform'"):
        diffusion.timestep_spacing(T, 10, "uniform")


def test_sampler_steps_consecutive():
    timesteps = diffusion.timestep_spacing(T, 10, "linspace")
    alpha_bar_t, alpha_bar_prev = diffusion.alpha_bar_pairs(SCHEDULE, jnp.asarray(timesteps))
    np.testing.assert_allclose(alpha_bar_t, ALPHA_BAR[timesteps], rtol=1e-5)
    # The step from 999 goes to 888, the step from 111 to 0, and the last one to alpha_bar = 1.
    np.testing.assert_allclose(alpha_bar_prev[:-1], ALPHA_BAR[timesteps[1:]], rtol=1e-5)
    assert float(alpha_bar_prev[0]) == pytest.approx(ALPHA_BAR[888], rel=1e-5)
    assert float(alpha_bar_prev[-2]) == pytest.approx(ALPHA_BAR[0], rel=1e-5)
    assert float(alpha_bar_prev[-1]) == 1.0


def test_ddim_trajectory_uses_next_entry():
    # With eps_pred = 0 a DDIM step scales x by sqrt(alpha_bar_prev / alpha_bar_t), so the
    # ratio of consecutive trajectory entries shows which alpha_bar each step moved to.
    timesteps = diffusion.timestep_spacing(T, 10, "linspace")
    x_T = np.ones((1, 1, 1, 1), np.float32)
    x_out, trajectory = diffusion.ddim_sample(
        _zero_model, SCHEDULE, x_T, jax.random.key(0), num_steps=10, return_trajectory=True
    )
    assert trajectory.shape == (10, 1, 1, 1, 1)
    np.testing.assert_array_equal(trajectory[-1], x_out)
    trajectory = np.asarray(trajectory, np.float64).reshape(10)
    previous = np.concatenate([[1.0], trajectory[:-1]])
    ratios = trajectory / previous
    alpha_bar_prev = np.append(ALPHA_BAR[timesteps[1:]], 1.0)
    np.testing.assert_allclose(ratios, np.sqrt(alpha_bar_prev / ALPHA_BAR[timesteps]), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# DDIM step and guidance
# ----------------------------------------------------------------------------------------------


def _ddim_reference(x_t, eps_pred, a_t, a_prev, eta, noise):
    x0 = (x_t - math.sqrt(1 - a_t) * eps_pred) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps_pred + sigma * noise


@pytest.mark.parametrize("eta, expected", [(0.0, 1.04130427), (0.5, 1.05798375), (1.0, 1.00696053)])
def test_ddim_step_eta(eta, expected):
    reference = _ddim_reference(1.0, 0.5, 0.5, 0.8, eta, 0.2)
    assert reference == pytest.approx(expected, abs=1e-8)
    x_prev = diffusion.ddim_step(1.0, 0.5, 0.5, 0.8, eta, 0.2)
    assert float(x_prev) == pytest.approx(expected, abs=1e-6)
    arrays = diffusion.ddim_step(
        jnp.full(SHAPE, 1.0), jnp.full(SHAPE, 0.5), 0.5, 0.8, eta, jnp.full(SHAPE, 0.2)
    )
    np.testing.assert_allclose(arrays, expected, atol=1e-6)


def test_ddim_step_needs_noise_for_eta():
    assert float(diffusion.ddim_step(1.0, 0.5, 0.5, 0.8, 0.0)) == pytest.approx(
        1.04130427, abs=1e-6
    )
    with pytest.raises(ValueError, match="eta=0.5 needs noise"):
        diffusion.ddim_step(1.0, 0.5, 0.5, 0.8, 0.5)


def _guidance_outputs():
    cond = jnp.concatenate([jnp.full((2, 3, 3, 4), 2.0), jnp.full((2, 3, 3, 4), 0.3)], axis=-1)
    uncond = jnp.concatenate([jnp.full((2, 3, 3, 4), 1.0), jnp.full((2, 3, 3, 4), -0.7)], axis=-1)
    return cond, uncond


def test_guidance_all_latent_channels():
    cond, uncond = _guidance_outputs()
    guided = np.asarray(diffusion.classifier_free_guidance(cond, uncond, 4.0, 4))
    assert guided.shape == (2, 3, 3, 8)
    for channel in range(4):
        np.testing.assert_allclose(guided[..., channel], 5.0, rtol=1e-6)
    for channel in range(4, 8):
        np.testing.assert_allclose(guided[..., channel], 0.3, rtol=1e-6)


def test_guidance_scale_one_is_conditional():
    cond, uncond = _normal(10, (2, 3, 3, 8)), _normal(11, (2, 3, 3, 8))
    guided = np.asarray(diffusion.classifier_free_guidance(cond, uncond, 1.0, 4))
    np.testing.assert_array_equal(guided, cond)
    guided_zero = np.asarray(diffusion.classifier_free_guidance(cond, uncond, 0.0, 4))
    np.testing.assert_allclose(guided_zero[..., :4], uncond[..., :4], atol=1e-6)
    np.testing.assert_array_equal(guided_zero[..., 4:], cond[..., 4:])


def test_guidance_rejects_negative_scale():
    cond, uncond = _guidance_outputs()
    with pytest.raises(ValueError, match="got -1.0"):
        diffusion.classifier_free_guidance(cond, uncond, -1.0, 4)
    with pytest.raises(ValueError, match="Guidance scale must be >= 0"):
        diffusion.guided_model_fn(lambda x, t, y: x, jnp.zeros((2,), jnp.int32), 10, -0.5, 4)


def test_guided_model_fn_batches_once():
    calls = []

    def apply_fn(x, t, y):
        calls.append((np.asarray(x), np.asarray(t), np.asarray(y)))
        eps = x[..., :4] + y.astype(x.dtype)[:, None, None, None]
        variance = jnp.where(y == 10, -0.7, 0.3)[:, None, None, None] * jnp.ones_like(eps)
        return jnp.concatenate([eps, variance], axis=-1)

    y = jnp.array([3, 7], jnp.int32)
    model_fn = diffusion.guided_model_fn(apply_fn, y, null_label=10, scale=4.0, latent_channels=4)
    x_t = _normal(12, (2, 3, 3, 4))
    t = jnp.array([500, 500], jnp.int32)
    output = np.asarray(model_fn(x_t, t))

    assert len(calls) == 1
    x_both, t_both, y_both = calls[0]
    assert x_both.shape == (4, 3, 3, 4)
    np.testing.assert_array_equal(x_both[:2], x_t)
    np.testing.assert_array_equal(x_both[2:], x_t)
    assert t_both.tolist() == [500, 500, 500, 500]
    assert y_both.tolist() == [3, 7, 10, 10]

    cond_eps = x_t + np.array([3.0, 7.0])[:, None, None, None]
    uncond_eps = x_t + 10.0
    np.testing.assert_allclose(
        output[..., :4], uncond_eps + 4.0 * (cond_eps - uncond_eps), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(output[..., 4:], 0.3, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction_type, spacing, num_steps",
    [("eps", "linspace", 50), ("v", "trailing", 10), ("x0", "leading", 1000)],
)
def test_ddim_oracle_recovers_x0(prediction_type, spacing, num_steps):
    x_0 = _normal(13)
    x_T = _normal(14)
    x_out = diffusion.ddim_sample(
        _oracle_model(x_0, prediction_type),
        SCHEDULE,
        x_T,
        jax.random.key(0),
        num_steps=num_steps,
        spacing=spacing,
        prediction_type=prediction_type,
    )
    np.testing.assert_allclose(x_out, x_0, atol=1e-5)


@pytest.mark.parametrize("prediction_type, num_steps", [("eps", None), ("v", 20), ("x0", 7)])
def test_ddpm_oracle_recovers_x0(prediction_type, num_steps):
    x_0 = _normal(15)
    x_T = _normal(16)
    x_out = diffusion.ddpm_sample(
        _oracle_model(x_0, prediction_type),
        SCHEDULE,
        x_T,
        jax.random.key(1),
        num_steps=num_steps,
        prediction_type=prediction_type,
    )
    np.testing.assert_allclose(x_out, x_0, atol=1e-5)


def test_ddpm_oracle_learned_variance():
    x_0 = _normal(17)
    oracle = _oracle_model(x_0, "eps")

    def model_fn(x_t, t):
        eps = oracle(x_t, t)
        return jnp.concatenate([eps, jnp.full_like(eps, 0.5)], axis=-1)

    x_out = diffusion.ddpm_sample(
        model_fn, SCHEDULE, _normal(18), jax.random.key(2), num_steps=25, learned_variance=True
    )
    np.testing.assert_allclose(x_out, x_0, atol=1e-5)
    with pytest.raises(ValueError, match="learned_variance=True"):
        diffusion.ddpm_sample(
            oracle, SCHEDULE, _normal(18), jax.random.key(2), num_steps=25, learned_variance=True
        )


@pytest.mark.parametrize("fixed_variance", ["large", "small"])
def test_ddpm_two_steps_by_hand(fixed_variance):
    # Two strided steps 999 -> 0 -> clean with a model that predicts eps = 0, so
    # x0_pred = x_t / sqrt(alpha_bar_t), and step i draws noise from fold_in(key, i).
    key = jax.random.key(3)
    x_T = _normal(19, (1, 2, 2, 1)).astype(np.float64)
    x_out, trajectory = diffusion.ddpm_sample(
        _zero_model,
        SCHEDULE,
        x_T.astype(np.float32),
        key,
        num_steps=2,
        fixed_variance=fixed_variance,
        return_trajectory=True,
    )
    assert trajectory.shape == (2, 1, 2, 2, 1)
    np.testing.assert_array_equal(trajectory[-1], x_out)
    a_t, a_prev = ALPHA_BAR[999], ALPHA_BAR[0]
    beta = 1 - a_t / a_prev
    mean = (beta * math.sqrt(a_prev) / (1 - a_t)) * (x_T / math.sqrt(a_t)) + (
        (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)
    ) * x_T
    variance = beta if fixed_variance == "large" else beta * (1 - a_prev) / (1 - a_t)
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), x_T.shape), np.float64)
    first = mean + math.sqrt(variance) * noise
    np.testing.assert_allclose(trajectory[0], first, rtol=1e-4, atol=1e-5)
    # The final step moves to alpha_bar = 1: coef1 = 1, coef2 = 0 and no noise.
    np.testing.assert_allclose(trajectory[1], first / math.sqrt(a_prev), rtol=1e-4, atol=1e-5)


def test_ddpm_full_chain_uses_schedule_betas():
    # One step of the full chain from t = 1 (timesteps [1, 0]) must use beta_1 itself.
    key = jax.random.key(4)
    x_T = _normal(20, (1, 2, 2, 1)).astype(np.float64)
    _, trajectory = diffusion.ddpm_sample(
        _zero_model,
        SCHEDULE,
        x_T.astype(np.float32),
        key,
        timesteps=np.array([1, 0]),
        fixed_variance="large",
        return_trajectory=True,
    )
    a_t, a_prev, beta = ALPHA_BAR[1], ALPHA_BAR[0], BETAS[1]
    x0_pred = x_T / math.sqrt(a_t)
    mean = beta * math.sqrt(a_prev) / (1 - a_t) * x0_pred + (
        (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t) * x_T
    )
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), x_T.shape), np.float64)
    # The respaced beta 1 - alpha_bar_1 / alpha_bar_0 is computed in float32, hence rtol 1e-3.
    np.testing.assert_allclose(trajectory[0], mean + math.sqrt(beta) * noise, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_clip_x0_applies(sampler):
    x_T = _normal(21)

    def model_fn(x_t, t):
        del t
        return jnp.full_like(x_t, 3.0)

    kwargs = {"num_steps": 5, "prediction_type": "x0", "clip_x0": 1.0}
    if sampler == "ddim":
        x_out = diffusion.ddim_sample(model_fn, SCHEDULE, x_T, jax.random.key(0), **kwargs)
    else:
        x_out = diffusion.ddpm_sample(model_fn, SCHEDULE, x_T, jax.random.key(0), **kwargs)
    np.testing.assert_allclose(x_out, 1.0, atol=1e-6)


def test_sampler_deterministic_for_key():
    x_T = _normal(23)
    # With eps_pred = 0 nothing pulls the samples together, so the injected noise shows.
    runs = {
        "ddpm": jax.jit(
            lambda key: diffusion.ddpm_sample(_zero_model, SCHEDULE, x_T, key, num_steps=8)
        ),
        "ddim_eta1": jax.jit(
            lambda key: diffusion.ddim_sample(_zero_model, SCHEDULE, x_T, key, num_steps=8, eta=1.0)
        ),
    }
    for name, run in runs.items():
        first = np.asarray(run(jax.random.key(5)))
        again = np.asarray(run(jax.random.key(5)))
        other = np.asarray(run(jax.random.key(6)))
        np.testing.assert_array_equal(first, again, err_msg=name)
        assert np.max(np.abs(first - other)) > 1e-3, name

    ddim = jax.jit(lambda key: diffusion.ddim_sample(_zero_model, SCHEDULE, x_T, key, num_steps=8))
    np.testing.assert_array_equal(ddim(jax.random.key(5)), ddim(jax.random.key(6)))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_compiles_once(sampler):
    x_T = _normal(25)
    sampler_traces, model_traces = [], []

    def model_fn(x_t, t):
        model_traces.append(t.shape)
        return jnp.zeros_like(x_t)

    def sample(x_T, key, timesteps):
        sampler_traces.append(timesteps.shape)
        if sampler == "ddim":
            return diffusion.ddim_sample(model_fn, SCHEDULE, x_T, key, timesteps=timesteps, eta=0.5)
        return diffusion.ddpm_sample(model_fn, SCHEDULE, x_T, key, timesteps=timesteps)

    chex.clear_trace_counter()
    sample_jit = jax.jit(chex.assert_max_traces(sample, n=1))
    outputs = []
    for mode in diffusion.SPACING_MODES:
        timesteps = jnp.asarray(diffusion.timestep_spacing(T, 10, mode))
        outputs.append(np.asarray(sample_jit(x_T, jax.random.key(0), timesteps)))
    assert sampler_traces == [(10,)]
    # One trace of the scan body for 10 steps: the loop is not unrolled in Python.
    assert model_traces == [(SHAPE[0],)]
    # Different step arrays must still give different samples.
    assert np.max(np.abs(outputs[0] - outputs[1])) > 1e-3


def test_sampler_input_checks():
    x_T = _normal(27)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"in \[1, 1000\].*got 0"):
        diffusion.ddim_sample(_zero_model, SCHEDULE, x_T, key, num_steps=0)
    with pytest.raises(ValueError, match=r"in \[1, 1000\].*got 1001"):
        diffusion.ddpm_sample(_zero_model, SCHEDULE, x_T, key, num_steps=1001)
    with pytest.raises(ValueError, match="Unknown spacing"):
        diffusion.ddim_sample(_zero_model, SCHEDULE, x_T, key, num_steps=5, spacing="uniform")
    with pytest.raises(ValueError, match="not both"):
        diffusion.ddim_sample(
            _zero_model, SCHEDULE, x_T, key, num_steps=2, timesteps=np.array([5, 0])
        )
    with pytest.raises(ValueError, match="strictly decreasing"):
        diffusion.ddim_sample(_zero_model, SCHEDULE, x_T, key, timesteps=np.array([0, 5]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        diffusion.ddim_sample(_zero_model, SCHEDULE, x_T, key, timesteps=np.array([1000, 5]))
    with pytest.raises(ValueError, match="Unknown fixed_variance"):
        diffusion.ddpm_sample(_zero_model, SCHEDULE, x_T, key, num_steps=2, fixed_variance="mid")
