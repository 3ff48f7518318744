"""Tests for vqdiff_jax.quantizer against numpy references and hand-worked values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqdiff_jax import quantizer as vq

# ---------------------------------------------------------------- helpers


def _mesh(num_devices):
    return Mesh(np.array(jax.devices()[:num_devices]), ("data",))


def _state_from_codebook(codebook):
    """Consistent state: one pseudo-count per code and sums equal to the codes."""
    codebook = jnp.asarray(codebook, jnp.float32)
    return vq.VQState(
        codebook=codebook,
        cluster_size=jnp.ones(codebook.shape[0], jnp.float32),
        embed_sum=codebook,
    )


def _ema_train_step(state, z_e, *, decay, eps, commitment_weight):
    """Compose the quantizer the way a train step with an EMA codebook does.

    The forward pass and the loss use the codebook before the update, and the
    update uses the codes found with that codebook.
    """
    z_q, codes = vq.quantize(z_e, state.codebook)
    losses = vq.vq_loss(z_e, z_q, commitment_weight=commitment_weight, learned_codebook=False)
    decoder_input = vq.straight_through(z_e, z_q)
    new_state = vq.ema_update(state, z_e, codes, decay=decay, eps=eps)
    return new_state, decoder_input, losses


def _numpy_nearest(z, codebook):
    z = np.asarray(z, np.float64).reshape(-1, codebook.shape[-1])
    distances = ((z[:, None, :] - np.asarray(codebook, np.float64)[None]) ** 2).sum(-1)
    return distances.argmin(-1)


def _numpy_ema(cluster_size, embed_sum, z_e, codes, decay, eps):
    num_codes, dim = embed_sum.shape
    z_e = np.asarray(z_e, np.float64).reshape(-1, dim)
    codes = np.asarray(codes).reshape(-1)
    counts = np.zeros(num_codes)
    sums = np.zeros((num_codes, dim))
    for row, code in zip(z_e, codes):
        counts[code] += 1
        sums[code] += row
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def _random_state(rng, num_codes, dim):
    codebook = rng.normal(size=(num_codes, dim)).astype(np.float32)
    cluster_size = rng.uniform(0.0, 3.0, size=num_codes).astype(np.float32)
    embed_sum = (codebook * cluster_size[:, None]).astype(np.float32)
    state = vq.VQState(
        codebook=jnp.asarray(codebook),
        cluster_size=jnp.asarray(cluster_size),
        embed_sum=jnp.asarray(embed_sum),
    )
    return state, codebook, cluster_size, embed_sum


# ---------------------------------------------------------------- init


def test_init_state_consistent():
    state = vq.init_vq_state(jax.random.key(0), 16, 4)
    assert state.codebook.shape == (16, 4)
    assert state.codebook.dtype == jnp.float32
    np.testing.assert_array_equal(state.cluster_size, np.ones(16))
    np.testing.assert_array_equal(state.embed_sum, state.codebook)


def test_init_l2_normalized_rows():
    state = vq.init_vq_state(jax.random.key(0), 16, 4, l2_normalize=True)
    norms = np.linalg.norm(np.asarray(state.codebook), axis=-1)
    np.testing.assert_allclose(norms, np.ones(16), rtol=1e-6)
    np.testing.assert_array_equal(state.embed_sum, state.codebook)


@pytest.mark.parametrize(
    "num_codes, dim, bad_name",
    [(0, 4, "num_codes"), (8, 0, "dim"), (-1, 4, "num_codes"), (2.5, 4, "num_codes")],
)
def test_init_rejects_bad_sizes(num_codes, dim, bad_name):
    with pytest.raises(ValueError, match=rf"{bad_name} must be an integer >= 1, got"):
        vq.init_vq_state(jax.random.key(0), num_codes, dim)


def test_l2_normalize_matches_numpy():
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    expected = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(vq.l2_normalize(jnp.asarray(x)), expected, rtol=1e-6)
    np.testing.assert_array_equal(vq.l2_normalize(jnp.zeros((2, 3))), np.zeros((2, 3)))


# ---------------------------------------------------------------- search


def test_nearest_codes_matches_numpy():
    rng = np.random.default_rng(1)
    codebook = rng.normal(size=(37, 6)).astype(np.float32)
    z = rng.normal(size=(2, 5, 7, 6)).astype(np.float32)
    codes = vq.nearest_codes(jnp.asarray(z), jnp.asarray(codebook))
    assert codes.shape == (2, 5, 7)
    assert codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), _numpy_nearest(z, codebook))


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 70, 100])
def test_nearest_codes_chunked_equal(chunk_size):
    rng = np.random.default_rng(2)
    codebook = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 5, 7, 5)), jnp.float32)  # 70 rows
    expected = vq.nearest_codes(z, codebook)
    chunked = jax.jit(lambda z: vq.nearest_codes(z, codebook, chunk_size=chunk_size))(z)
    assert chunked.shape == (2, 5, 7)
    np.testing.assert_array_equal(chunked, expected)


def test_nearest_codes_chunked_sharded():
    rng = np.random.default_rng(3)
    codebook = rng.normal(size=(32, 4)).astype(np.float32)
    z = rng.normal(size=(8, 4, 4)).astype(np.float32)
    z_sharded = jax.device_put(z, NamedSharding(_mesh(8), P("data")))
    codes = jax.jit(lambda z: vq.nearest_codes(z, jnp.asarray(codebook), chunk_size=16))(z_sharded)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), _numpy_nearest(z, codebook))


def test_nearest_codes_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        vq.nearest_codes(jnp.zeros((4, 2)), jnp.zeros((3, 2)), chunk_size=0)


def test_nearest_codes_bfloat16_close_codes():
    # In bfloat16, 100^2 rounds to a multiple of 64 and 2 * 100 * 100.5 to a multiple
    # of 128, which swamps the distance gap of 0.75.
    z = jnp.array([[100.0]], jnp.bfloat16)
    codebook = jnp.array([[99.0], [100.5]], jnp.bfloat16)
    assert int(vq.nearest_codes(z, codebook)[0]) == 1


def test_nearest_codes_float16_no_overflow():
    # 300^2 = 90000 overflows float16 (maximum 65504).
    z = jnp.array([[300.0]], jnp.float16)
    codebook = jnp.array([[299.0], [300.5]], jnp.float16)
    codes = vq.nearest_codes(z, codebook)
    assert int(codes[0]) == 1
    z_q, _ = vq.quantize(z, codebook)
    assert not bool(jnp.any(jnp.isnan(z_q)))


@pytest.mark.parametrize("dtype, offset", [(jnp.bfloat16, 100.0), (jnp.float16, 300.0)])
def test_nearest_codes_low_precision_1024(dtype, offset):
    # A 32 x 32 grid with step 0.5 far from the origin: neighbours are 0.25 apart in
    # squared distance, while the squared norms are about offset^2 * 2.
    k = np.arange(1024)
    grid = np.stack([offset + 0.5 * (k % 32), offset + 0.5 * (k // 32)], axis=-1)
    codebook = jnp.asarray(grid, dtype)
    np.testing.assert_array_equal(np.asarray(codebook, np.float64), grid)  # exact in dtype
    true_codes = np.array([1000, 1001, 1002, 1003])
    z = codebook[true_codes]
    np.testing.assert_array_equal(vq.nearest_codes(z, codebook), true_codes)


def test_lookup_gathers_rows():
    codebook = np.arange(12, dtype=np.float32).reshape(4, 3)
    codes = np.array([[3, 0], [1, 1]], np.int32)
    out = vq.lookup(jnp.asarray(codebook), jnp.asarray(codes))
    np.testing.assert_array_equal(out, codebook[codes])


def test_lookup_out_of_range_nan():
    out = vq.lookup(jnp.ones((4, 2)), jnp.array([4], jnp.int32))
    assert bool(jnp.all(jnp.isnan(out)))


def test_quantize_l2_normalized():
    codebook = jnp.array([[10.0, 0.0], [1.0, 1.0]])
    z = jnp.array([[8.0, 6.0]])
    # Euclidean: code 0 (squared distances 40 and 74). Cosine: code 1 (the angle
    # is 36.9 degrees to code 0 and 8.1 degrees to code 1).
    assert int(vq.quantize(z, codebook)[1][0]) == 0
    z_q, codes = vq.quantize(z, codebook, l2_normalize=True)
    assert int(codes[0]) == 1
    np.testing.assert_allclose(z_q, [[np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)


# ---------------------------------------------------------------- losses


def test_train_step_order():
    state = _state_from_codebook([[0.0], [10.0]])
    z_e = jnp.array([[1.0], [3.0]])
    new_state, decoder_input, losses = _ema_train_step(
        state, z_e, decay=0.5, eps=1e-5, commitment_weight=0.25
    )
    # Both vectors are nearest to code 0 of the codebook before the update.
    np.testing.assert_array_equal(decoder_input, [[0.0], [0.0]])
    # mean((1 - 0)^2, (3 - 0)^2) = 5.
    np.testing.assert_allclose(losses["commitment_loss"], 5.0, rtol=1e-7)
    # cluster_size = [1.5, 0.5], embed_sum = [2, 5] and n = 2, so
    # code 0 = 2 / ((1.5 + 1e-5) / (2 + 2e-5) * 2) = 2.00002 / 1.50001.
    np.testing.assert_allclose(new_state.cluster_size, [1.5, 0.5], rtol=1e-7)
    np.testing.assert_allclose(new_state.embed_sum, [[2.0], [5.0]], rtol=1e-7)
    np.testing.assert_allclose(new_state.codebook[0, 0], 1.3333378, rtol=1e-6)
    np.testing.assert_allclose(new_state.codebook[1, 0], 5.00005 / 0.50001, rtol=1e-6)


def _loss_and_grads(learned_codebook):
    z = jnp.array([[1.0, 2.0]])
    codebook = jnp.array([[0.0, 0.0], [10.0, 10.0]])

    def loss_fn(z, codebook):
        z_q, _ = vq.quantize(z, codebook)
        losses = vq.vq_loss(z, z_q, commitment_weight=0.25, learned_codebook=learned_codebook)
        return losses["loss"], losses

    (loss, losses), (grad_z, grad_codebook) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(z, codebook)
    return loss, losses, grad_z, grad_codebook


def test_vq_loss_beta_placement():
    loss, losses, grad_z, grad_codebook = _loss_and_grads(learned_codebook=True)
    # The codebook and commitment terms are both mean(1, 4) = 2.5, so 2.5 + 0.25 * 2.5.
    np.testing.assert_allclose(loss, 3.125, rtol=1e-7)
    np.testing.assert_allclose(losses["codebook_loss"], 2.5, rtol=1e-7)
    np.testing.assert_allclose(losses["commitment_loss"], 2.5, rtol=1e-7)
    # d/dz of 0.25 * mean((z - q)^2) over 2 elements is 0.25 * (z - q).
    np.testing.assert_allclose(grad_z, [[0.25, 0.5]], rtol=1e-7)
    # d/dq of mean((z - q)^2) is q - z, unweighted.
    np.testing.assert_allclose(grad_codebook[0], [-1.0, -2.0], rtol=1e-7)
    np.testing.assert_array_equal(grad_codebook[1], [0.0, 0.0])


def test_vq_loss_ema_codebook():
    loss, losses, grad_z, grad_codebook = _loss_and_grads(learned_codebook=False)
    np.testing.assert_allclose(loss, 0.625, rtol=1e-7)
    np.testing.assert_allclose(losses["codebook_loss"], 2.5, rtol=1e-7)
    np.testing.assert_allclose(grad_z, [[0.25, 0.5]], rtol=1e-7)
    np.testing.assert_array_equal(grad_codebook, np.zeros((2, 2)))


def test_vq_loss_ema_logged_terms_no_grad():
    z = jnp.array([[1.0, 2.0]])
    codebook = jnp.array([[0.0, 0.0], [10.0, 10.0]])

    def codebook_term(codebook):
        z_q, _ = vq.quantize(z, codebook)
        return vq.vq_loss(z, z_q, commitment_weight=0.25, learned_codebook=False)["codebook_loss"]

    np.testing.assert_array_equal(jax.grad(codebook_term)(codebook), np.zeros((2, 2)))


def test_vq_loss_low_precision_float32():
    z_e = jnp.array([[1.0, 2.0]], jnp.bfloat16)
    z_q = jnp.array([[0.0, 0.0]], jnp.bfloat16)
    losses = vq.vq_loss(z_e, z_q, commitment_weight=0.25, learned_codebook=True)
    assert losses["loss"].dtype == jnp.float32
    np.testing.assert_allclose(losses["loss"], 3.125, rtol=1e-7)


def test_vq_loss_rejects_negative_beta():
    with pytest.raises(ValueError, match="commitment_weight must be >= 0.0, got -1.0"):
        vq.vq_loss(jnp.ones((2,)), jnp.ones((2,)), commitment_weight=-1.0, learned_codebook=True)


def test_straight_through_grads():
    z = jnp.array([[1.0, 2.0]])
    codebook = jnp.array([[0.0, 0.0], [10.0, 10.0]])
    weights = jnp.array([3.0, -1.0])

    def f(z, codebook):
        z_q, _ = vq.quantize(z, codebook)
        return jnp.sum(vq.straight_through(z, z_q) * weights)

    z_q, _ = vq.quantize(z, codebook)
    np.testing.assert_array_equal(vq.straight_through(z, z_q), [[0.0, 0.0]])
    grad_z, grad_codebook = jax.grad(f, argnums=(0, 1))(z, codebook)
    np.testing.assert_array_equal(grad_z, [[3.0, -1.0]])
    np.testing.assert_array_equal(grad_codebook, np.zeros((2, 2)))


def test_straight_through_forward_exact():
    # z_e + (z_q - z_e) rounds to a multiple of ulp(z_e) = 1/128 here.
    z_e = jnp.array([123456.7, -98765.4], jnp.float32)
    z_q = jnp.array([0.1, 0.3], jnp.float32)
    np.testing.assert_array_equal(vq.straight_through(z_e, z_q), z_q)


# ---------------------------------------------------------------- usage metrics


def test_code_histogram_matches_bincount():
    codes = np.random.default_rng(4).integers(0, 9, size=(3, 5, 5)).astype(np.int32)
    counts = vq.code_histogram(jnp.asarray(codes), 9)
    assert counts.dtype == jnp.float32
    np.testing.assert_array_equal(counts, np.bincount(codes.reshape(-1), minlength=9))


@pytest.mark.parametrize(
    "codes, perplexity, used",
    [
        ([0, 0, 1, 3, 3, 3], 2.74945927, 3),
        ([2, 2, 2, 2], 1.0, 1),
        ([0, 1, 2, 3], 4.0, 4),
    ],
)
def test_perplexity_values(codes, perplexity, used):
    counts = vq.code_histogram(jnp.array(codes, jnp.int32), 4)
    metrics = vq.usage_metrics(counts)
    np.testing.assert_allclose(metrics["perplexity"], perplexity, rtol=1e-6)
    assert float(metrics["codes_used"]) == used
    np.testing.assert_allclose(metrics["codes_used_fraction"], used / 4)


def test_perplexity_numpy_entropy():
    counts = np.array([2.0, 1.0, 0.0, 3.0])
    probs = counts / counts.sum()
    expected = np.exp(-np.sum(probs[probs > 0] * np.log(probs[probs > 0])))
    np.testing.assert_allclose(expected, 2.74945927, rtol=1e-8)  # the hand value above
    np.testing.assert_allclose(
        vq.usage_metrics(jnp.asarray(counts))["perplexity"], expected, rtol=1e-6
    )


def test_usage_dead_codes():
    metrics = vq.usage_metrics(
        jnp.array([1.0, 0.0, 2.0]),
        cluster_size=jnp.array([0.5, 1.0, 0.99]),
        dead_threshold=1.0,
    )
    assert float(metrics["dead_codes"]) == 2.0


def test_usage_empty_histogram():
    metrics = vq.usage_metrics(jnp.zeros(4))
    assert float(metrics["perplexity"]) == 1.0
    assert float(metrics["codes_used"]) == 0.0


def test_perplexity_global_shard_map():
    mesh = _mesh(2)
    codes = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)

    def per_device(codes):
        counts = vq.code_histogram(codes, 4, axis_name="data")
        return vq.usage_metrics(counts)["perplexity"]

    perplexity = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P()))(
        codes
    )
    # Each device alone has one code (perplexity 1), but the global batch has two.
    np.testing.assert_allclose(perplexity, 2.0, rtol=1e-6)


def test_perplexity_global_named_sharding():
    codes = jax.device_put(
        jnp.array([0, 0, 0, 1, 1, 1], jnp.int32), NamedSharding(_mesh(2), P("data"))
    )
    shards = sorted(np.asarray(s.data).tolist() for s in codes.addressable_shards)
    assert shards == [[0, 0, 0], [1, 1, 1]]
    perplexity = jax.jit(lambda c: vq.usage_metrics(vq.code_histogram(c, 4))["perplexity"])(codes)
    np.testing.assert_allclose(perplexity, 2.0, rtol=1e-6)


# ---------------------------------------------------------------- EMA update


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(5)
    state, _, cluster_size, embed_sum = _random_state(rng, 12, 3)
    z_e = rng.normal(size=(4, 5, 3)).astype(np.float32)
    codes = rng.integers(0, 12, size=(4, 5)).astype(np.int32)
    new_state = jax.jit(lambda s, z, c: vq.ema_update(s, z, c, decay=0.9, eps=1e-3))(
        state, jnp.asarray(z_e), jnp.asarray(codes)
    )
    expected = _numpy_ema(cluster_size, embed_sum, z_e, codes, 0.9, 1e-3)
    np.testing.assert_allclose(new_state.cluster_size, expected[0], rtol=1e-5)
    np.testing.assert_allclose(new_state.embed_sum, expected[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.codebook, expected[2], rtol=1e-5, atol=1e-6)


def test_ema_update_l2_normalized():
    rng = np.random.default_rng(6)
    state = vq.init_vq_state(jax.random.key(1), 8, 4, l2_normalize=True)
    z_e = jnp.asarray(rng.normal(size=(16, 4)) * 5.0, jnp.float32)
    codes = vq.nearest_codes(vq.l2_normalize(z_e), state.codebook)
    new_state = vq.ema_update(state, z_e, codes, decay=0.8, eps=1e-5, l2_normalize=True)
    norms = np.linalg.norm(np.asarray(new_state.codebook), axis=-1)
    np.testing.assert_allclose(norms, np.ones(8), rtol=1e-5)
    # Statistics are accumulated from the normalised vectors.
    z_unit = np.asarray(z_e) / np.linalg.norm(np.asarray(z_e), axis=-1, keepdims=True)
    expected = _numpy_ema(
        np.ones(8), np.asarray(state.embed_sum), z_unit, np.asarray(codes), 0.8, 1e-5
    )
    np.testing.assert_allclose(new_state.embed_sum, expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 1.5, "eps": 1e-5}, r"decay must be in \[0.0, 1.0\], got 1.5"),
        ({"decay": 0.9, "eps": 0.0}, "eps must be > 0"),
    ],
)
def test_ema_update_rejects_bad_args(kwargs, message):
    state = _state_from_codebook([[0.0], [1.0]])
    with pytest.raises(ValueError, match=message):
        vq.ema_update(state, jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32), **kwargs)


def _sharded_ema_inputs():
    rng = np.random.default_rng(7)
    state, *_ = _random_state(rng, 16, 4)
    z_e = jnp.asarray(rng.normal(size=(16, 3, 4)), jnp.float32)
    codes = vq.nearest_codes(z_e, state.codebook)
    single = vq.ema_update(state, z_e, codes, decay=0.95, eps=1e-5)
    return state, z_e, codes, single


def _assert_states_close(actual, expected):
    for name in ("codebook", "cluster_size", "embed_sum"):
        np.testing.assert_allclose(
            getattr(actual, name), getattr(expected, name), rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_ema_update_shard_map_global():
    state, z_e, codes, single = _sharded_ema_inputs()

    def per_device(state, z_e, codes):
        return vq.ema_update(state, z_e, codes, decay=0.95, eps=1e-5, axis_name="data")

    sharded = jax.jit(
        jax.shard_map(
            per_device,
            mesh=_mesh(8),
            in_specs=(P(), P("data"), P("data")),
            out_specs=P(),
        )
    )(state, z_e, codes)
    _assert_states_close(sharded, single)


def test_ema_update_shard_map_without_axis_differs():
    # Guard for the test above: per-device statistics are not the global ones.
    state, z_e, codes, single = _sharded_ema_inputs()

    def per_device(state, z_e, codes):
        new_state = vq.ema_update(state, z_e, codes, decay=0.95, eps=1e-5)
        return new_state.cluster_size[None]

    local_sizes = jax.jit(
        jax.shard_map(
            per_device,
            mesh=_mesh(8),
            in_specs=(P(), P("data"), P("data")),
            out_specs=P("data"),
        )
    )(state, z_e, codes)
    assert not np.allclose(local_sizes[0], single.cluster_size)


def test_ema_update_named_sharding_global():
    state, z_e, codes, single = _sharded_ema_inputs()
    sharding = NamedSharding(_mesh(8), P("data"))
    z_e = jax.device_put(z_e, sharding)
    codes = jax.device_put(codes, sharding)
    sharded = jax.jit(lambda s, z, c: vq.ema_update(s, z, c, decay=0.95, eps=1e-5))(
        state, z_e, codes
    )
    _assert_states_close(sharded, single)


# ---------------------------------------------------------------- dead codes


def _check_restart(state, new_state, num_restarted, z_e, threshold):
    """Compare a restart with the dead mask computed in numpy."""
    cluster_size = np.asarray(state.cluster_size)
    dead = cluster_size < threshold
    rows = np.asarray(z_e, np.float32).reshape(-1, state.codebook.shape[-1])
    assert int(num_restarted) == dead.sum()
    assert num_restarted.dtype == jnp.int32

    live = ~dead
    np.testing.assert_array_equal(new_state.codebook[live], np.asarray(state.codebook)[live])
    np.testing.assert_array_equal(new_state.cluster_size[live], cluster_size[live])
    np.testing.assert_array_equal(new_state.embed_sum[live], np.asarray(state.embed_sum)[live])

    np.testing.assert_array_equal(new_state.cluster_size[dead], np.ones(dead.sum()))
    np.testing.assert_array_equal(new_state.embed_sum[dead], new_state.codebook[dead])
    for vector in np.asarray(new_state.codebook)[dead]:
        assert np.any(np.all(rows == vector, axis=-1)), f"{vector} is not in the batch"
    return dead


def test_restart_matches_numpy():
    rng = np.random.default_rng(8)
    state, *_ = _random_state(rng, 12, 3)
    z_e = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    new_state, num_restarted = jax.jit(
        lambda s, z, k: vq.restart_dead_codes(s, z, k, threshold=1.0)
    )(state, z_e, jax.random.key(0))
    dead = _check_restart(state, new_state, num_restarted, z_e, 1.0)
    assert dead.sum() >= 2
    # 20 rows >= 12 codes, so the draw is without replacement.
    restarted = np.asarray(new_state.codebook)[dead]
    assert len(np.unique(restarted, axis=0)) == dead.sum()


def test_restart_small_batch():
    rng = np.random.default_rng(9)
    state, *_ = _random_state(rng, 12, 3)
    z_e = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)  # fewer rows than codes
    new_state, num_restarted = vq.restart_dead_codes(state, z_e, jax.random.key(1), threshold=2.5)
    _check_restart(state, new_state, num_restarted, z_e, 2.5)


def test_restart_none_dead():
    state = _state_from_codebook(np.eye(3))
    new_state, num_restarted = vq.restart_dead_codes(
        state, jnp.zeros((4, 3)), jax.random.key(0), threshold=0.5
    )
    assert int(num_restarted) == 0
    np.testing.assert_array_equal(new_state.codebook, np.eye(3))


def test_restart_shard_map_same_as_global():
    rng = np.random.default_rng(10)
    state, *_ = _random_state(rng, 12, 3)
    z_e = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    key = jax.random.key(2)
    expected, expected_count = vq.restart_dead_codes(state, z_e, key, threshold=1.0)

    def per_device(state, z_e, key):
        return vq.restart_dead_codes(state, z_e, key, threshold=1.0, axis_name="data")

    sharded, count = jax.jit(
        jax.shard_map(
            per_device,
            mesh=_mesh(8),
            in_specs=(P(), P("data"), P()),
            out_specs=(P(), P()),
        )
    )(state, z_e, key)
    assert int(count) == int(expected_count)
    _assert_states_close(sharded, expected)
