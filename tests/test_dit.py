"""Tests for the Diffusion Transformer: adaLN-Zero, patches, position embeddings, labels."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqdiff_jax.models import dit

NUM_CLASSES = 10


def _tiny(**kwargs) -> dit.DiT:
    return dit.dit_from_preset("DiT-Tiny/2", num_classes=NUM_CLASSES, **kwargs)


def _inputs(key, shape=(2, 8, 8, 4)):
    key_x, key_t, key_y = jax.random.split(key, 3)
    x = jax.random.normal(key_x, shape)
    t = jax.random.randint(key_t, (shape[0],), 0, 1000)
    y = jax.random.randint(key_y, (shape[0],), 0, NUM_CLASSES)
    return x, t, y


# The tests share compiled forward and gradient functions, one per model configuration, and
# initial parameters. Initialisation runs op by op: after the first model, JAX's cache of
# compiled ops makes each further one cheaper than compiling a jitted init.
@functools.cache
def _compiled_apply(model: dit.DiT):
    return jax.jit(model.apply, static_argnames="train")


def _apply(model, variables, x, t, y, **kwargs):
    return _compiled_apply(model)(variables, x, t, y, **kwargs)


@functools.cache
def _init_params(model: dit.DiT, channels: int):
    """Initial parameters for latents with `channels` channels (seed 0)."""
    side = 2 * model.patch_size
    x = jnp.zeros((1, side, side, channels))
    t = y = jnp.zeros((1,), jnp.int32)
    return model.init(jax.random.key(0), x, t, y, train=False)["params"]


def _init(model, x, t, y):
    del t, y  # The parameters depend only on the model and the channel count.
    return {"params": _init_params(model, x.shape[-1])}


def _randomize(params, seed, stddev=0.1):
    """Replace every parameter by normal noise, so no layer is zero any more."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(stddev * rng.standard_normal(leaf.shape), leaf.dtype), params
    )


def _path_name(path) -> str:
    return "/".join(str(getattr(entry, "key", entry)) for entry in path)


# ------------------------------------------------------------------------------------------
# adaLN-Zero and initialisation.
# ------------------------------------------------------------------------------------------


def test_adaln_zero_params_at_init():
    model = _tiny()
    params = _init(model, *_inputs(jax.random.key(0)))["params"]

    for i in range(model.depth):
        modulation = params[f"blocks_{i}"]["adaLN_modulation"]
        assert np.all(np.asarray(modulation["kernel"]) == 0), f"blocks_{i} kernel"
        assert np.all(np.asarray(modulation["bias"]) == 0), f"blocks_{i} bias"
    for layer in ("adaLN_modulation", "linear"):
        final = params["final_layer"][layer]
        assert np.all(np.asarray(final["kernel"]) == 0), f"final_layer/{layer} kernel"
        assert np.all(np.asarray(final["bias"]) == 0), f"final_layer/{layer} bias"


def test_init_distributions():
    model = _tiny()
    params = _init(model, *_inputs(jax.random.key(0)))["params"]

    # xavier_uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), std a / sqrt(3).
    xavier_kernels = {
        "x_embedder": params["x_embedder"]["kernel"],
        "qkv": params["blocks_0"]["attn"]["qkv"]["kernel"],
        "proj": params["blocks_0"]["attn"]["proj"]["kernel"],
        "mlp_fc1": params["blocks_0"]["mlp"]["fc1"]["kernel"],
        "mlp_fc2": params["blocks_0"]["mlp"]["fc2"]["kernel"],
    }
    for name, kernel in xavier_kernels.items():
        kernel = np.asarray(kernel)
        bound = math.sqrt(6.0 / (kernel.shape[0] + kernel.shape[1]))
        assert np.abs(kernel).max() <= bound, name
        assert kernel.std() == pytest.approx(bound / math.sqrt(3.0), rel=0.15), name

    normal_002 = {
        "t_fc1": params["t_embedder"]["fc1"]["kernel"],
        "t_fc2": params["t_embedder"]["fc2"]["kernel"],
        "label_table": params["y_embedder"]["embedding_table"]["embedding"],
    }
    for name, kernel in normal_002.items():
        assert np.asarray(kernel).std() == pytest.approx(0.02, rel=0.15), name

    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _path_name(path).endswith("bias"):
            assert np.all(np.asarray(leaf) == 0), _path_name(path)


def test_output_zero_at_init():
    for learn_sigma in (False, True):
        model = _tiny(learn_sigma=learn_sigma)
        x, t, y = _inputs(jax.random.key(1))
        variables = _init(model, x, t, y)
        out = _apply(model, variables, x, t, y, train=False)
        assert np.all(np.asarray(out) == 0), f"learn_sigma={learn_sigma}"


@functools.cache
def _compiled_grad(model: dit.DiT):
    def loss_fn(params, x, t, y, target):
        out = model.apply({"params": params}, x, t, y, train=False)
        return jnp.mean((out - target) ** 2)

    return jax.jit(jax.grad(loss_fn))


def _mse_grads(model, params, x, t, y, target):
    return _compiled_grad(model)(params, x, t, y, target)


def test_grad_at_init_only_final_linear():
    model = _tiny()
    x, t, y = _inputs(jax.random.key(3))
    params = _init(model, x, t, y)["params"]
    target = jax.random.normal(jax.random.key(4), x.shape)

    grads = _mse_grads(model, params, x, t, y, target)

    final_linear = ("final_layer/linear/kernel", "final_layer/linear/bias")
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        name = _path_name(path)
        if name in final_linear:
            assert np.any(np.asarray(grad) != 0), f"{name} gradient is zero"
        else:
            assert np.all(np.asarray(grad) == 0), f"{name} gradient is not zero"


def test_grad_reaches_every_leaf():
    # Counterpart of the test above: with non-zero weights every parameter gets a gradient,
    # so the zeros there come from adaLN-Zero and not from a disconnected graph.
    model = _tiny()
    x, t, y = _inputs(jax.random.key(3))
    params = _randomize(_init(model, x, t, y)["params"], seed=5)
    target = jax.random.normal(jax.random.key(4), x.shape)

    grads = _mse_grads(model, params, x, t, y, target)

    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.any(np.asarray(grad) != 0), f"{_path_name(path)} gradient is zero"


# ------------------------------------------------------------------------------------------
# Patches and position embeddings on a non-square latent.
# ------------------------------------------------------------------------------------------


def _coded_latent():
    """Latent [1, 4, 6, 2] whose value at (h, w, c) is 100*h + 10*w + c."""
    h, w, c = np.meshgrid(np.arange(4), np.arange(6), np.arange(2), indexing="ij")
    return (100 * h + 10 * w + c).astype(np.float32)[None]


def test_patchify_non_square_values():
    x = _coded_latent()

    tokens = np.asarray(dit.patchify(jnp.asarray(x), 2))

    assert tokens.shape == (1, 6, 8)
    np.testing.assert_array_equal(tokens[0, 5], [240, 241, 250, 251, 340, 341, 350, 351])
    np.testing.assert_array_equal(tokens[0, 1], [20, 21, 30, 31, 120, 121, 130, 131])
    for row in range(2):
        for col in range(3):
            expected = x[0, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2, :].reshape(-1)
            np.testing.assert_array_equal(tokens[0, 3 * row + col], expected)


def test_unpatchify_inverts_patchify():
    x = jnp.asarray(_coded_latent())
    restored = dit.unpatchify(dit.patchify(x, 2), 2, 4, 6, 2)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(x))

    x_random = jax.random.normal(jax.random.key(0), (3, 8, 12, 5))
    restored = dit.unpatchify(dit.patchify(x_random, 4), 4, 8, 12, 5)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(x_random))


def test_pos_embed_rows_and_columns():
    dim, grid_h, grid_w = 64, 2, 3
    pos = dit.get_2d_sincos_pos_embed(dim, grid_h, grid_w)
    assert pos.shape == (grid_h * grid_w, dim)
    col_half, row_half = pos[:, : dim // 2], pos[:, dim // 2 :]

    for row in range(grid_h):
        for col in range(grid_w):
            token = row * grid_w + col
            np.testing.assert_array_equal(row_half[token], row_half[row * grid_w])
            np.testing.assert_array_equal(col_half[token], col_half[col])
    # Different rows and different columns must get different halves.
    assert not np.allclose(row_half[0], row_half[grid_w])
    assert not np.allclose(col_half[0], col_half[1])
    assert not np.allclose(col_half[1], col_half[2])


def test_pos_embed_numpy_formula():
    dim, grid_h, grid_w = 16, 3, 5
    quarter = dim // 4
    expected = np.zeros((grid_h * grid_w, dim))
    for row in range(grid_h):
        for col in range(grid_w):
            for k in range(quarter):
                freq = 10000.0 ** (-k / quarter)
                token = row * grid_w + col
                expected[token, k] = math.sin(col * freq)
                expected[token, quarter + k] = math.cos(col * freq)
                expected[token, 2 * quarter + k] = math.sin(row * freq)
                expected[token, 3 * quarter + k] = math.cos(row * freq)

    pos = dit.get_2d_sincos_pos_embed(dim, grid_h, grid_w)

    assert pos.dtype == np.float64
    np.testing.assert_allclose(pos, expected, rtol=1e-12, atol=1e-12)


def test_pos_embed_dim_error():
    with pytest.raises(ValueError, match="divisible by 4"):
        dit.get_2d_sincos_pos_embed(18, 2, 2)


def test_dit_runs_non_square():
    model = _tiny()
    x = jnp.asarray(_coded_latent()) / 100.0
    t, y = jnp.array([7]), jnp.array([3])
    params = _randomize(_init(model, x, t, y)["params"], seed=6)

    out = _apply(model, {"params": params}, x, t, y, train=False)

    assert out.shape == (1, 4, 6, 2)
    assert np.all(np.isfinite(np.asarray(out)))
    assert np.any(np.asarray(out) != 0)


def test_timestep_embedding_numpy_formula():
    t = np.array([0, 1, 17, 999])
    dim, half = 8, 4
    expected = np.zeros((len(t), dim))
    for i, step in enumerate(t):
        for k in range(half):
            freq = math.exp(-math.log(10000.0) * k / half)
            expected[i, k] = math.cos(step * freq)
            expected[i, half + k] = math.sin(step * freq)

    np.testing.assert_allclose(dit.timestep_embedding(jnp.asarray(t), dim), expected, atol=1e-4)
    np.testing.assert_allclose(
        dit.timestep_embedding(jnp.asarray(t, jnp.float32), dim), expected, atol=1e-4
    )
    odd = np.asarray(dit.timestep_embedding(jnp.asarray(t), dim + 1))
    np.testing.assert_allclose(odd[:, :dim], expected, atol=1e-4)
    np.testing.assert_array_equal(odd[:, dim], 0)


# ------------------------------------------------------------------------------------------
# Labels: null id, dropout, validation.
# ------------------------------------------------------------------------------------------


def _drop_labels(embedder, y, *, train, seed=0, force_drop_ids=None):
    variables = embedder.init(jax.random.key(0), y, train=False)
    return embedder.apply(
        variables, y, train, force_drop_ids,
        method=dit.LabelEmbedder.drop_labels, rngs={"label_drop": jax.random.key(seed)},
    )


def test_label_table_and_null_id():
    embedder = dit.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    variables = embedder.init(jax.random.key(0), jnp.arange(10), train=False)
    assert variables["params"]["embedding_table"]["embedding"].shape == (11, 8)
    assert embedder.null_label == 10

    model = _tiny()
    params = _init(model, *_inputs(jax.random.key(0)))["params"]
    assert params["y_embedder"]["embedding_table"]["embedding"].shape == (11, model.hidden_size)

    # The null id follows num_classes, whatever it is.
    embedder_3 = dit.LabelEmbedder(num_classes=3, hidden_size=8, dropout_prob=1.0)
    dropped = _drop_labels(embedder_3, jnp.array([0, 1, 2]), train=True)
    np.testing.assert_array_equal(dropped, [3, 3, 3])


def test_label_drop_prob_one_and_zero():
    y = jnp.arange(1000) % 10
    always = dit.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=1.0)
    never = dit.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0)

    np.testing.assert_array_equal(_drop_labels(always, y, train=True), np.full(1000, 10))
    np.testing.assert_array_equal(_drop_labels(never, y, train=True), np.asarray(y))


def test_label_drop_rate():
    n = 200_000
    y = jax.random.randint(jax.random.key(1), (n,), 0, 10)
    embedder = dit.LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.1)

    dropped = np.asarray(_drop_labels(embedder, y, train=True, seed=2))

    is_null = dropped == 10
    assert 0.098 <= is_null.mean() <= 0.102
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(y)[~is_null])


def test_label_drop_off_in_eval():
    y = jnp.arange(10)
    embedder = dit.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=1.0)
    variables = embedder.init(jax.random.key(0), y, train=False)

    np.testing.assert_array_equal(_drop_labels(embedder, y, train=False), np.asarray(y))
    # No 'label_drop' RNG is needed in evaluation, and the embedding is the table row of y.
    embedding = embedder.apply(variables, y, False)
    table = np.asarray(variables["params"]["embedding_table"]["embedding"])
    np.testing.assert_array_equal(np.asarray(embedding), table[np.arange(10)])

    force = jnp.array([1, 0] * 5)
    np.testing.assert_array_equal(
        _drop_labels(embedder, y, train=False, force_drop_ids=force),
        np.where(np.asarray(force) == 1, 10, np.arange(10)),
    )


def test_label_drop_per_sample_in_dit():
    # Each sample's output must equal either its all-kept or its all-dropped output, so the
    # decision is made once per sample and not per block, token or feature.
    model = _tiny(class_dropout_prob=0.5)
    x, t, y = _inputs(jax.random.key(7), shape=(8, 8, 8, 4))
    params = _randomize(_init(model, x, t, y)["params"], seed=8)
    variables = {"params": params}
    batch = x.shape[0]
    keep_all, drop_all = jnp.zeros(batch, int), jnp.ones(batch, int)

    rngs = {"label_drop": jax.random.key(9)}
    out_train = _apply(model, variables, x, t, y, train=True, rngs=rngs)
    out_kept = _apply(model, variables, x, t, y, train=False, force_drop_ids=keep_all)
    out_dropped = _apply(model, variables, x, t, y, train=False, force_drop_ids=drop_all)

    decisions = []
    for i in range(batch):
        assert not np.allclose(out_kept[i], out_dropped[i], atol=1e-3), f"sample {i}"
        kept = np.allclose(out_train[i], out_kept[i], atol=1e-5)
        dropped = np.allclose(out_train[i], out_dropped[i], atol=1e-5)
        assert kept != dropped, f"sample {i} mixes kept and dropped labels"
        decisions.append(dropped)
    assert 0 < sum(decisions) < batch


def test_label_drop_needs_rng():
    model = _tiny()
    x, t, y = _inputs(jax.random.key(0))
    variables = _init(model, x, t, y)
    with pytest.raises(ValueError, match="label_drop"):
        _apply(model, variables, x, t, y, train=True)


def test_check_labels_range():
    dit.check_labels(np.arange(11), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\].*max 11"):
        dit.check_labels(np.array([0, 11]), 10)
    with pytest.raises(ValueError, match="min -1"):
        dit.check_labels(np.array([-1, 3]), 10)
    with pytest.raises(ValueError, match="integers"):
        dit.check_labels(np.array([1.0]), 10)


def test_dit_rejects_bad_labels():
    model = _tiny()
    x, t, _ = _inputs(jax.random.key(0))
    variables = _init(model, x, t, jnp.array([0, 10]))
    with pytest.raises(ValueError, match="max 11"):
        model.apply(variables, x, t, jnp.array([0, 11]), train=False)

    # Under jit the values are unknown, so the out-of-range row is NaN (see check_labels).
    params = _randomize(variables["params"], seed=1)
    out = _apply(model, {"params": params}, x, t, jnp.array([0, 11]), train=False)
    assert np.all(np.isfinite(np.asarray(out[0])))
    assert np.all(np.isnan(np.asarray(out[1])))


# ------------------------------------------------------------------------------------------
# Shapes, presets, dtypes, errors.
# ------------------------------------------------------------------------------------------


def test_output_shape_learn_sigma():
    x, t, y = _inputs(jax.random.key(0), shape=(2, 8, 8, 4))
    for learn_sigma, channels in ((False, 4), (True, 8)):
        model = _tiny(learn_sigma=learn_sigma)
        out = _apply(model, _init(model, x, t, y), x, t, y, train=False)
        assert out.shape == (2, 8, 8, channels), f"learn_sigma={learn_sigma}"
        assert out.dtype == jnp.float32


def test_presets_resolve():
    sizes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    expected = {
        f"DiT-{size}/{p}": (hidden, depth, heads, p)
        for size, (hidden, depth, heads) in sizes.items()
        for p in (1, 2, 4, 8)
    }
    expected["DiT-Tiny/1"] = (64, 2, 2, 1)
    expected["DiT-Tiny/2"] = (64, 2, 2, 2)
    assert set(dit.DIT_CONFIGS) == set(expected)

    for name, (hidden, depth, heads, p) in expected.items():
        model = dit.dit_from_preset(
            name, num_classes=1000, learn_sigma=True, class_dropout_prob=0.2, dtype=jnp.bfloat16
        )
        assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (
            hidden, depth, heads, p,
        ), name
        assert model.num_classes == 1000
        assert model.learn_sigma
        assert model.class_dropout_prob == 0.2
        assert model.dtype == jnp.bfloat16


def test_unknown_preset_error():
    with pytest.raises(ValueError, match=r"'DiT-XXL/2'.*DiT-XL/2"):
        dit.dit_from_preset("DiT-XXL/2", num_classes=10)


def test_indivisible_size_error():
    model = _tiny()
    x, t, y = _inputs(jax.random.key(0), shape=(1, 5, 6, 2))
    with pytest.raises(ValueError, match="height 5 and width 6.*patch_size 2"):
        model.init(jax.random.key(0), x, t, y, train=False)
    with pytest.raises(ValueError, match="patch_size 4"):
        dit.patchify(jnp.zeros((1, 8, 6, 2)), 4)


def test_bf16_close_to_f32():
    x, t, y = _inputs(jax.random.key(0), shape=(2, 8, 8, 4))
    model_f32 = _tiny()
    model_bf16 = _tiny(dtype=jnp.bfloat16)
    init_shapes = jax.eval_shape(
        functools.partial(model_bf16.init, train=False), jax.random.key(0), x, t, y
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(init_shapes):
        assert leaf.dtype == jnp.float32, _path_name(path)

    params = _randomize(_init(model_f32, x, t, y)["params"], seed=1)
    out_f32 = _apply(model_f32, {"params": params}, x, t, y, train=False)
    out_bf16 = _apply(model_bf16, {"params": params}, x, t, y, train=False)

    assert out_bf16.dtype == jnp.float32
    relative_error = np.linalg.norm(out_bf16 - out_f32) / np.linalg.norm(out_f32)
    assert relative_error < 0.05
    # The compute dtype is really used: bfloat16 rounding changes the output.
    assert relative_error > 0
    jaxpr = str(jax.make_jaxpr(lambda p: model_bf16.apply({"params": p}, x, t, y, train=False))(
        params
    ))
    assert "bf16" in jaxpr


def test_jit_compiles_once():
    model = _tiny()
    x, t, y = _inputs(jax.random.key(0))
    variables = _init(model, x, t, y)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, x, t, y, key):
        return model.apply(variables, x, t, y, train=True, rngs={"label_drop": key})

    forward(variables, x, t, y, jax.random.key(1))
    forward(variables, x, t + 1, (y + 1) % NUM_CLASSES, jax.random.key(2))


def test_attention_matches_numpy_reference():
    """Self-attention against a numpy softmax(q k^T / sqrt(h)) v written out per head."""
    hidden, heads, tokens = 12, 3, 5
    head_dim = hidden // heads
    layer = dit.Attention(hidden, heads)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, tokens, hidden))
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    # Non-zero biases, so that a bias dropped anywhere shows.
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    out = np.asarray(layer.apply({"params": params}, x))

    x64 = np.asarray(x, np.float64)
    w_qkv = np.asarray(params["qkv"]["kernel"], np.float64)
    b_qkv = np.asarray(params["qkv"]["bias"], np.float64)
    w_proj = np.asarray(params["proj"]["kernel"], np.float64)
    b_proj = np.asarray(params["proj"]["bias"], np.float64)
    qkv = x64 @ w_qkv + b_qkv  # [B, T, 3D], laid out as (q | k | v), each head contiguous
    expected = np.zeros((2, tokens, hidden))
    for b in range(2):
        heads_out = []
        for n in range(heads):
            cols = slice(n * head_dim, (n + 1) * head_dim)
            q = qkv[b, :, :hidden][:, cols]
            k = qkv[b, :, hidden:2 * hidden][:, cols]
            v = qkv[b, :, 2 * hidden:][:, cols]
            logits = q @ k.T / math.sqrt(head_dim)
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            heads_out.append(weights @ v)
        expected[b] = np.concatenate(heads_out, axis=1) @ w_proj + b_proj
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_mlp_and_kernel_grads_match_numpy():
    """MLP output and its kernel gradients against numpy, for tokens [batch, tokens, hidden]."""
    hidden, mlp_hidden = 6, 10
    layer = dit.Mlp(hidden, mlp_hidden)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, hidden))
    upstream = jax.random.normal(jax.random.PRNGKey(1), (2, 3, hidden))
    params = _randomize(layer.init(jax.random.PRNGKey(2), x)["params"], seed=3, stddev=0.5)

    def weighted_sum(p):
        return jnp.sum(layer.apply({"params": p}, x) * upstream)

    out = np.asarray(layer.apply({"params": params}, x))
    grads = jax.grad(weighted_sum)(params)

    x64 = np.asarray(x, np.float64).reshape(-1, hidden)  # [B * T, D]
    dy = np.asarray(upstream, np.float64).reshape(-1, hidden)
    w1 = np.asarray(params["fc1"]["kernel"], np.float64)
    b1 = np.asarray(params["fc1"]["bias"], np.float64)
    w2 = np.asarray(params["fc2"]["kernel"], np.float64)
    b2 = np.asarray(params["fc2"]["bias"], np.float64)
    pre_activation = x64 @ w1 + b1
    inner = math.sqrt(2 / math.pi) * (pre_activation + 0.044715 * pre_activation**3)
    h = 0.5 * pre_activation * (1 + np.tanh(inner))  # GELU, tanh approximation
    expected = h @ w2 + b2
    np.testing.assert_allclose(out.reshape(-1, hidden), expected, rtol=1e-5, atol=1e-5)

    # Derivative of the tanh GELU with respect to its input, written out.
    gelu_slope = 0.5 * (1 + np.tanh(inner)) + 0.5 * pre_activation * (
        1 - np.tanh(inner) ** 2) * (math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * pre_activation**2))
    grad_pre_activation = (dy @ w2.T) * gelu_slope
    np.testing.assert_allclose(grads["fc2"]["kernel"], h.T @ dy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["fc1"]["kernel"], x64.T @ grad_pre_activation,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["fc1"]["bias"], grad_pre_activation.sum(axis=0),
                               rtol=1e-4, atol=1e-5)
