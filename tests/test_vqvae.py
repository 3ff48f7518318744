"""VQ-VAE encoder and decoder: shapes, the code projection, sub-pixel upsampling, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqdiff_jax.models import vqvae


def _model(**overrides):
    fields = {"image_channels": 1, "channels": 8, "channel_mult": (1, 2, 2),
              "num_res_blocks": 1, "latent_dim": 4, "norm_groups": 4}
    return vqvae.VQVAE(**{**fields, **overrides})


def _init(model, image_shape, seed=0):
    """Random parameters drawn with numpy in the shapes `init_params` gives.

    Compiling the random initialisers takes many seconds of CPU time; these tests
    need parameters of the right structure, not the initialisers' values.
    """
    shapes = jax.eval_shape(
        lambda: vqvae.init_params(model, jax.random.key(0), image_shape))
    return _random_like(shapes, seed)


def _random_like(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def f4_params():
    """Parameters of `_model()`. Convolutions and GroupNorm fit any image size."""
    return _init(_model(), (16, 16, 1))


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def _encode(model, params, x):
    return model.apply({"params": params}, x, method=vqvae.VQVAE.encode)


def _decode(model, params, z):
    return model.apply({"params": params}, z, method=vqvae.VQVAE.decode)


# ---------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------


def test_f4_shapes(f4_params):
    model = _model()
    z_e = _encode(model, f4_params, _images((2, 28, 28, 1)))
    assert model.downsample_factor == 4
    assert z_e.shape == (2, 7, 7, 4)
    assert _decode(model, f4_params, z_e).shape == (2, 28, 28, 1)


def test_f8_shapes():
    model = _model(image_channels=3, channel_mult=(1, 1, 2, 2))
    params = _init(model, (64, 64, 3))
    z_e = _encode(model, params, _images((2, 64, 64, 3)))
    assert model.downsample_factor == 8
    assert z_e.shape == (2, 8, 8, 4)
    assert _decode(model, params, z_e).shape == (2, 64, 64, 3)


def test_lookup_dim_projection():
    # With lookup_dim, the quantized vectors are a linear map of the encoder latent, and
    # the decoder maps them back to latent_dim before decoding.
    model = _model(lookup_dim=2)
    params = _init(model, (16, 16, 1))
    x = _images((2, 16, 16, 1))
    latent = model.apply({"params": params}, x, method=lambda m, x: m.encoder(x))
    z_e = _encode(model, params, x)

    assert model.code_dim == 2
    assert latent.shape == (2, 4, 4, 4)
    assert z_e.shape == (2, 4, 4, 2)
    kernel = np.asarray(params["project_in"]["kernel"], np.float64)
    bias = np.asarray(params["project_in"]["bias"], np.float64)
    expected = np.asarray(latent, np.float64) @ kernel + bias
    np.testing.assert_allclose(z_e, expected, rtol=1e-5, atol=1e-6)
    assert params["project_out"]["kernel"].shape == (2, 4)
    assert _decode(model, params, z_e).shape == (2, 16, 16, 1)


def test_l2_normalize_unit_vectors(f4_params):
    x = _images((2, 16, 16, 1))
    z_plain = np.asarray(_encode(_model(), f4_params, x), np.float64)
    z_unit = np.asarray(_encode(_model(l2_normalize=True), f4_params, x), np.float64)

    np.testing.assert_allclose(np.linalg.norm(z_unit, axis=-1), 1.0, rtol=1e-5)
    expected = z_plain / np.linalg.norm(z_plain, axis=-1, keepdims=True)
    np.testing.assert_allclose(z_unit, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Upsample2x against an explicit 3x3 convolution and depth-to-space.
# ---------------------------------------------------------------------------


def _upsample_reference(xp, x, kernel, bias):
    """Upsample2x written with the array module `xp` (numpy or jax.numpy) and explicit loops.

    The convolution is a sum of nine shifted copies of the zero-padded input. Output
    channel (2 * di + dj) * C + c of the convolution goes to pixel (2i + di, 2j + dj).
    """
    _, h, w, _ = x.shape
    channels = kernel.shape[-1] // 4
    padded = xp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = bias
    for di in range(3):
        for dj in range(3):
            conv = conv + xp.einsum("bhwc,co->bhwo", padded[:, di:di + h, dj:dj + w], kernel[di, dj])
    rows = []
    for i in range(h):
        for di in range(2):
            row = []
            for j in range(w):
                for dj in range(2):
                    start = (2 * di + dj) * channels
                    row.append(conv[:, i, j, start:start + channels])  # [B, C]
            rows.append(xp.stack(row, axis=1))  # [B, 2w, C]
    return xp.stack(rows, axis=1)  # [B, 2h, 2w, C]


def test_upsample_depth_to_space():
    module = vqvae.Upsample2x(channels=3)
    x = _images((2, 4, 5, 6))
    # Random values everywhere, the bias included, so a misplaced channel shows.
    params = _random_like(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    kernel = np.asarray(params["Conv_0"]["kernel"], np.float64)
    bias = np.asarray(params["Conv_0"]["bias"], np.float64)

    out = module.apply({"params": params}, x)
    expected = _upsample_reference(np, x.astype(np.float64), kernel, bias)
    assert out.shape == (2, 8, 10, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_upsample_gradients():
    module = vqvae.Upsample2x(channels=2)
    x = jnp.asarray(_images((1, 3, 3, 4)))
    weights = jnp.asarray(_images((1, 6, 6, 2), seed=1))
    params = _random_like(jax.eval_shape(module.init, jax.random.key(0), x)["params"])

    def module_loss(params, x):
        return jnp.sum(module.apply({"params": params}, x) * weights)

    def reference_loss(params, x):
        conv = params["Conv_0"]
        return jnp.sum(_upsample_reference(jnp, x, conv["kernel"], conv["bias"]) * weights)

    grads = jax.jit(jax.grad(module_loss, argnums=(0, 1)))(params, x)
    expected = jax.jit(jax.grad(reference_loss, argnums=(0, 1)))(params, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Invalid inputs.
# ---------------------------------------------------------------------------


def test_size_not_divisible_raises():
    with pytest.raises(ValueError, match=r"30x30 is not divisible by the downsampling factor 4"):
        vqvae.init_params(_model(), jax.random.key(0), (30, 30, 1))


def test_size_not_divisible_names_fix():
    with pytest.raises(ValueError, match=r"resize the images to a multiple of 8"):
        vqvae.init_params(_model(channel_mult=(1, 1, 2, 2)), jax.random.key(0), (28, 28, 1))


def test_latent_dim_zero_raises():
    with pytest.raises(ValueError, match=r"latent_dim must be >= 1, got 0. Set model.latent_dim"):
        vqvae.init_params(_model(latent_dim=0), jax.random.key(0), (16, 16, 1))


def test_lookup_dim_zero_raises():
    with pytest.raises(ValueError, match=r"lookup_dim must be >= 1 or None, got 0"):
        vqvae.init_params(_model(lookup_dim=0), jax.random.key(0), (16, 16, 1))


def test_wrong_channels_raises(f4_params):
    with pytest.raises(ValueError, match=r"set model.image_channels=3"):
        _encode(_model(), f4_params, _images((2, 16, 16, 3)))


def test_unbatched_images_raise():
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        _model().check_images(np.zeros((16, 16, 1), np.float32))
