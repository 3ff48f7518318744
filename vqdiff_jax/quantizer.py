"""Vector quantization as pure functions: nearest-code search, losses, EMA codebook.

The functions follow the style of optax: plain functions with explicit state and
explicit RNG keys, all of them usable under `jax.jit`. A train step composes them as

    z_q, codes = quantize(z_e, vq_state.codebook)          # codebook before the update
    losses = vq_loss(z_e, z_q, commitment_weight=0.25, learned_codebook=False)
    z_q = straight_through(z_e, z_q)                        # decoder input
    ...
    vq_state = ema_update(vq_state, z_e, codes, decay=0.99, eps=1e-5)

Conventions:

* Shapes: `z_e` and `z_q` are `[..., D]` (usually `[batch, height, width, D]`),
  `codes` has the same leading shape and dtype int32, `codebook` is `[K, D]`.
* Nearest-code distances and all codebook statistics are float32, whatever the dtype
  of `z_e`. Squared norms of bfloat16 or float16 vectors lose the digits that
  separate close codes, and float16 squares of values above about 256 overflow.
* `VQState` contains the codebook and its EMA statistics. It is updated by
  `ema_update` and `restart_dead_codes`, never by the optimizer. A state is
  consistent when `codebook ~= embed_sum / cluster_size[:, None]`.
* Multi-device: under `jit` with a batch-sharded `NamedSharding`, sums over the batch
  are global without further work. Under `shard_map`, pass the mesh axis of the batch
  as `axis_name` so that statistics are summed over all devices, which keeps the
  replicated codebook identical everywhere.
"""

from __future__ import annotations

import numbers

import chex
import flax
import jax
import jax.numpy as jnp
from jax import lax


@flax.struct.dataclass
class VQState:
    """Codebook and its EMA statistics, kept outside the trainable parameters.

    Attributes:
      codebook: `[K, D]` float32 code vectors.
      cluster_size: `[K]` EMA of the number of vectors assigned to each code.
      embed_sum: `[K, D]` EMA of the sum of the vectors assigned to each code.
    """

    codebook: jax.Array
    cluster_size: jax.Array
    embed_sum: jax.Array


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """Scale `x` to unit L2 norm along `axis`, clamping norms below `eps` to `eps`."""
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / jnp.maximum(norm, eps)


# Several functions below take a keyword argument named `l2_normalize`, which hides
# the function inside them.
_l2_normalize = l2_normalize


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _check_range(name: str, value, low: float, high: float | None = None) -> None:
    """Raise ValueError unless a Python number is in `[low, high]`. Traced values pass."""
    if not isinstance(value, numbers.Real):
        return
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}.")


def init_vq_state(
    key: jax.Array,
    num_codes: int,
    dim: int,
    *,
    l2_normalize: bool = False,
    scale: float = 1.0,
) -> VQState:
    """Create a consistent `VQState` with a random normal codebook.

    Args:
      key: PRNG key for the codebook.
      num_codes: number of codes K.
      dim: code dimension D.
      l2_normalize: give every code unit L2 norm, for cosine-similarity search.
      scale: standard deviation of the codebook entries before normalisation. Match
        it to the scale of the encoder outputs.

    Returns:
      A state with `cluster_size = 1` and `embed_sum = codebook`, so the first
      `ema_update` starts from one pseudo-count per code.
    """
    _check_positive_int("num_codes", num_codes)
    _check_positive_int("dim", dim)

    codebook = scale * jax.random.normal(key, (num_codes, dim), jnp.float32)
    if l2_normalize:
        codebook = _l2_normalize(codebook)
    return VQState(
        codebook=codebook,
        cluster_size=jnp.ones((num_codes,), jnp.float32),
        # A separate buffer, so that a jitted step can donate both leaves of a state
        # built outside `jit`.
        embed_sum=jnp.copy(codebook),
    )


# The CPU search works on blocks of about this many float32 distances (2 MiB), which
# stay in cache between the matmul that writes them and the reductions that read them.
# With N = 16384, D = 64 on 2 AMD EPYC (Zen 4) cores and jax 0.10.2, blocks of 2**18,
# 2**19 and 2**20 distances took 10.7, 9.6 and 9.9 ms for K = 512, and 141, 126 and
# 126 ms for K = 8192. One jnp.argmin over the whole [N, K] matrix took 27 and 404 ms.
_CPU_BLOCK_ELEMENTS = 2**19


def _first_argmin(distances: jax.Array, axis: int) -> jax.Array:
    """Return `jnp.argmin(distances, axis)` computed as two plain reductions.

    XLA's CPU argmin reduces (value, index) pairs and is several times slower than a
    min. The minimum is found first, then the lowest index that reaches it. A slice
    that contains NaN gets the index of its first NaN, as `jnp.argmin` gives.
    """
    axis = axis % distances.ndim
    size = distances.shape[axis]
    min_distance = jnp.min(distances, axis=axis, keepdims=True)  # NaN if any is NaN
    is_min = (distances == min_distance) | jnp.isnan(distances)
    index = lax.broadcasted_iota(jnp.int32, distances.shape, axis)
    return jnp.min(jnp.where(is_min, index, size), axis=axis)


def _nearest_rows(
    z: jax.Array, minus_two_codebook: jax.Array, codebook_sq: jax.Array, precision
) -> jax.Array:
    """Return the index of the closest code for each row of `z` `[N, D]`.

    `minus_two_codebook` is `-2 * codebook` `[K, D]` and `codebook_sq` the squared
    norms `[K]`, both float32.
    """
    # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2. The ||z||^2 term is the same for every
    # code, so it is left out: the argmin does not change and one rounding is saved.
    # Scaling by -2 is exact in floating point (barring overflow and underflow), so
    # z.(-2e) equals -2 (z.e) bit for bit.
    # The DEFAULT precision rounds float32 inputs to bfloat16 on TPU and to TF32 on
    # A100/H100 GPUs (docstring of `jax.lax.Precision`). HIGHEST keeps float32.

    def search_cpu(z):
        # Codes along the major axis: both reductions then take an elementwise
        # minimum of whole rows, which vectorises better on CPU than a reduction
        # along the minor axis.
        dots = jnp.einsum("kd,nd->kn", minus_two_codebook, z, precision=precision)  # [K, N]
        return _first_argmin(codebook_sq[:, None] + dots, axis=0)

    def search_default(z):
        # GPU and TPU compile argmin to one fused reduction.
        dots = jnp.einsum("nd,kd->nk", z, minus_two_codebook, precision=precision)  # [N, K]
        return jnp.argmin(codebook_sq + dots, axis=-1).astype(jnp.int32)

    return lax.platform_dependent(z, cpu=search_cpu, default=search_default)


def _auto_chunk_size(num_rows: int, num_codes: int) -> int | None:
    """Pick the CPU chunk size: blocks of about `_CPU_BLOCK_ELEMENTS` distances.

    The rows are split into a power-of-two number of chunks that divides the rows
    of every device (`jax.device_count()` of them), so no chunk needs padding and a
    batch-sharded `z` keeps its sharding. Returns None when no such split exists.
    """
    num_devices = jax.device_count()
    num_chunks = 1
    while (
        num_rows * num_codes >= 2 * num_chunks * _CPU_BLOCK_ELEMENTS
        and num_rows % (2 * num_chunks * num_devices) == 0
    ):
        num_chunks *= 2
    return None if num_chunks == 1 else num_rows // num_chunks


def _search(z: jax.Array, codebook: jax.Array, chunk_size: int | None, precision) -> jax.Array:
    """Find the nearest code `[N]` of each row of `z` `[N, D]`, `chunk_size` rows at a time."""
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    codebook_sq = jnp.sum(codebook * codebook, axis=-1)  # [K]
    minus_two_codebook = -2.0 * codebook  # [K, D]
    num_rows = z.shape[0]
    if chunk_size is None or chunk_size >= num_rows:
        return _nearest_rows(z, minus_two_codebook, codebook_sq, precision)

    num_chunks = -(-num_rows // chunk_size)
    padded_rows = num_chunks * chunk_size
    z = jnp.pad(z, ((0, padded_rows - num_rows), (0, 0)))  # [N', D]
    # Chunk i contains rows i, i + num_chunks, i + 2 * num_chunks, ... . The row axis,
    # which `jit` may shard over devices, then stays inside each chunk, and the loop
    # runs over an unsharded axis without gathering the batch onto every device.
    chunks = z.reshape(chunk_size, num_chunks, -1).swapaxes(0, 1)
    # chunks: [num_chunks, chunk_size, D]
    codes = lax.map(
        lambda rows: _nearest_rows(rows, minus_two_codebook, codebook_sq, precision), chunks)
    return codes.swapaxes(0, 1).reshape(padded_rows)[:num_rows]  # [N]


def nearest_codes(
    z: jax.Array,
    codebook: jax.Array,
    *,
    chunk_size: int | str | None = "auto",
    precision=lax.Precision.HIGHEST,
) -> jax.Array:
    """Find the index of the nearest code (squared Euclidean distance) for each vector.

    Distances are computed in float32 for any input dtype. Ties go to the lowest index,
    and a vector whose distances contain NaN gets the index of the first NaN, as with
    `jnp.argmin`.

    Args:
      z: `[..., D]` vectors to quantize.
      codebook: `[K, D]` code vectors.
      chunk_size: if an integer, search this many rows of the flattened `z` at a time
        with `lax.map`, so the `[N, K]` distance matrix is at most `[chunk_size, K]`.
        The result equals the unchunked search. Under `jit` with a batch-sharded `z`,
        choose a multiple of the device count that divides the number of rows.
        Otherwise padding the rows moves data between devices (collective-permutes
        in the compiled HLO on 8 CPU devices). None searches all rows at once.
        'auto' (the default) picks cache-sized chunks on CPU and no chunks on other
        platforms.
      precision: matmul precision for the `z . codebook` products.

    Returns:
      `[...]` int32 code indices.
    """
    chex.assert_rank(codebook, 2)
    chex.assert_axis_dimension(z, -1, codebook.shape[-1])
    leading_shape = z.shape[:-1]
    z = z.reshape(-1, z.shape[-1])  # [N, D]

    if chunk_size == "auto":
        cpu_chunk_size = _auto_chunk_size(z.shape[0], codebook.shape[0])
        codes = lax.platform_dependent(
            z,
            codebook,
            cpu=lambda z, codebook: _search(z, codebook, cpu_chunk_size, precision),
            default=lambda z, codebook: _search(z, codebook, None, precision),
        )
    else:
        if chunk_size is not None:
            _check_positive_int("chunk_size", chunk_size)
        codes = _search(z, codebook, chunk_size, precision)
    return codes.reshape(leading_shape)


def lookup(codebook: jax.Array, codes: jax.Array) -> jax.Array:
    """Gather code vectors: `[K, D]` codebook and `[...]` codes give `[..., D]`.

    Out-of-range codes give NaN vectors, so an invalid index cannot pass unnoticed.
    Gradients flow to the gathered rows of `codebook`.
    """
    chex.assert_rank(codebook, 2)
    chex.assert_type(codes, int)
    return jnp.take(codebook, codes, axis=0, mode="fill", fill_value=jnp.nan)


def quantize(
    z_e: jax.Array,
    codebook: jax.Array,
    *,
    l2_normalize: bool = False,
    chunk_size: int | str | None = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Replace each vector by its nearest code, without the straight-through estimator.

    Args:
      z_e: `[..., D]` encoder outputs.
      codebook: `[K, D]` code vectors.
      l2_normalize: normalise `z_e` and the codebook before the search. `z_q` is then
        a normalised code vector.
      chunk_size: see `nearest_codes`.

    Returns:
      `(z_q, codes)`: `[..., D]` quantized vectors in the codebook's dtype and `[...]`
      int32 indices. Pass `z_q` to `vq_loss` and then to `straight_through`.
    """
    if l2_normalize:
        z_e = _l2_normalize(z_e)
        codebook = _l2_normalize(codebook)
    codes = nearest_codes(z_e, codebook, chunk_size=chunk_size)
    z_q = lookup(codebook, codes)
    return z_q, codes


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Return `z_q` in the forward pass with the gradient passed unchanged to `z_e`.

    This is `z_e + stop_gradient(z_q - z_e)`, written so that the forward value
    equals `z_q` exactly: the classic form rounds when `z_e` is much larger than
    `z_q`. The output has the promoted dtype of `z_e` and `z_q`.
    """
    chex.assert_equal_shape([z_e, z_q])
    # Forward: (z_e - z_e) + z_q == z_q. Backward: d/dz_e = 1, and z_q gets no gradient.
    return (z_e - lax.stop_gradient(z_e)) + lax.stop_gradient(z_q)


def vq_loss(
    z_e: jax.Array,
    z_q: jax.Array,
    *,
    commitment_weight: float,
    learned_codebook: bool,
) -> dict[str, jax.Array]:
    """Compute the codebook and commitment losses of a VQ-VAE.

    `codebook_loss = mean((stop_gradient(z_e) - z_q)^2)` moves codes towards the
    encoder outputs. `commitment_loss = mean((z_e - stop_gradient(z_q))^2)` moves
    the encoder outputs towards their codes. Both means run over all elements,
    including D. Only the commitment term is weighted:

        loss = codebook_loss + commitment_weight * commitment_loss

    With an EMA codebook (`learned_codebook=False`) the codebook term is left out of
    `loss`. It is still returned for logging but carries no gradient to `z_q`.

    Args:
      z_e: `[..., D]` encoder outputs.
      z_q: `[..., D]` quantized vectors from `quantize`, before `straight_through`.
      commitment_weight: beta, the weight of the commitment term.
      learned_codebook: whether the codebook is trained by gradient descent.

    Returns:
      float32 scalars under `loss`, `codebook_loss` and `commitment_loss`.
    """
    chex.assert_equal_shape([z_e, z_q])
    _check_range("commitment_weight", commitment_weight, 0.0)
    z_e = z_e.astype(jnp.float32)
    z_q = z_q.astype(jnp.float32)

    z_q_for_codebook = z_q if learned_codebook else lax.stop_gradient(z_q)
    codebook_loss = jnp.mean(jnp.square(lax.stop_gradient(z_e) - z_q_for_codebook))
    commitment_loss = jnp.mean(jnp.square(z_e - lax.stop_gradient(z_q)))

    loss = commitment_weight * commitment_loss
    if learned_codebook:
        loss = codebook_loss + loss
    return {
        "loss": loss,
        "codebook_loss": codebook_loss,
        "commitment_loss": commitment_loss,
    }


def code_histogram(codes: jax.Array, num_codes: int, *, axis_name: str | None = None) -> jax.Array:
    """Count how often each code occurs.

    Args:
      codes: `[...]` int32 code indices.
      num_codes: number of codes K.
      axis_name: mesh axis to sum the counts over under `shard_map` or `pmap`.

    Returns:
      `[K]` float32 counts.
    """
    chex.assert_type(codes, int)
    _check_positive_int("num_codes", num_codes)
    codes = codes.reshape(-1)
    counts = jax.ops.segment_sum(jnp.ones(codes.shape, jnp.float32), codes, num_segments=num_codes)
    if axis_name is not None:
        counts = lax.psum(counts, axis_name)
    return counts


def usage_metrics(
    counts: jax.Array,
    *,
    cluster_size: jax.Array | None = None,
    dead_threshold: float = 1.0,
) -> dict[str, jax.Array]:
    """Summarise codebook usage from code counts.

    Args:
      counts: `[K]` counts from `code_histogram`. Use global counts: the perplexity
        of a whole batch is not the mean of per-device perplexities.
      cluster_size: optional `[K]` EMA counts from `VQState`, for `dead_codes`.
      dead_threshold: a code is dead when its `cluster_size` is below this value.

    Returns:
      float32 scalars: `perplexity` (exp of the entropy of the code distribution,
      between 1 and K), `codes_used` (codes with a nonzero count),
      `codes_used_fraction`, and `dead_codes` when `cluster_size` is given.
    """
    chex.assert_rank(counts, 1)
    counts = counts.astype(jnp.float32)
    # An all-zero histogram has probabilities 0, entropy 0 and perplexity 1.
    probs = counts / jnp.maximum(jnp.sum(counts), 1e-12)
    entropy = jnp.sum(jax.scipy.special.entr(probs))
    codes_used = jnp.sum(counts > 0).astype(jnp.float32)
    metrics = {
        "perplexity": jnp.exp(entropy),
        "codes_used": codes_used,
        "codes_used_fraction": codes_used / counts.shape[0],
    }
    if cluster_size is not None:
        chex.assert_equal_shape([counts, cluster_size])
        metrics["dead_codes"] = jnp.sum(cluster_size < dead_threshold).astype(jnp.float32)
    return metrics


def ema_update(
    state: VQState,
    z_e: jax.Array,
    codes: jax.Array,
    *,
    decay: float,
    eps: float,
    axis_name: str | None = None,
    l2_normalize: bool = False,
) -> VQState:
    """Move the codebook towards the mean of the vectors assigned to each code.

    With `counts` and `sums` the per-code number and sum of the vectors of the whole
    batch:

        cluster_size <- decay * cluster_size + (1 - decay) * counts
        embed_sum    <- decay * embed_sum    + (1 - decay) * sums
        codebook      = embed_sum / smoothed cluster_size

    Laplace smoothing, `(cluster_size + eps) / (n + K * eps) * n` with
    `n = sum(cluster_size)`, keeps the divisor of unused codes above zero.

    Args:
      state: current statistics.
      z_e: `[..., D]` encoder outputs that were quantized to `codes`.
      codes: `[...]` int32 indices, computed with the codebook before this update.
      decay: EMA decay in [0, 1].
      eps: Laplace smoothing constant, > 0.
      axis_name: mesh axis to sum the statistics over under `shard_map` or `pmap`.
        Leave it None under `jit`, where the sums already cover the global batch.
      l2_normalize: normalise `z_e` before accumulating and the new codebook after,
        for a codebook searched by cosine similarity.

    Returns:
      The updated state.
    """
    num_codes, dim = state.codebook.shape
    chex.assert_axis_dimension(z_e, -1, dim)
    chex.assert_shape(codes, z_e.shape[:-1])
    chex.assert_type(codes, int)
    _check_range("decay", decay, 0.0, 1.0)
    if isinstance(eps, numbers.Real) and eps <= 0:
        raise ValueError(
            f"eps must be > 0 so that unused codes do not divide by zero, got {eps!r}."
        )

    z_e = z_e.reshape(-1, dim).astype(jnp.float32)  # [N, D]
    if l2_normalize:
        z_e = _l2_normalize(z_e)
    codes = codes.reshape(-1)  # [N]

    # segment_sum adds each row into its code's slot and never builds an [N, K]
    # one-hot matrix. With N = 16384, K = 1024, D = 16 on 2 CPU cores (jax 0.10.2)
    # it took 0.13 ms, against 170 ms for the one-hot matmul.
    counts = jax.ops.segment_sum(jnp.ones_like(codes, jnp.float32), codes, num_codes)
    sums = jax.ops.segment_sum(z_e, codes, num_codes)  # [K, D]
    if axis_name is not None:
        counts, sums = lax.psum((counts, sums), axis_name)

    cluster_size = decay * state.cluster_size + (1.0 - decay) * counts
    embed_sum = decay * state.embed_sum + (1.0 - decay) * sums

    total = jnp.sum(cluster_size)
    smoothed_size = (cluster_size + eps) / (total + num_codes * eps) * total
    codebook = embed_sum / smoothed_size[:, None]
    if l2_normalize:
        codebook = _l2_normalize(codebook)
    return VQState(codebook=codebook, cluster_size=cluster_size, embed_sum=embed_sum)


def _draw_rows(z_e: jax.Array, key: jax.Array, num_draws: int, axis_name) -> jax.Array:
    """Draw `num_draws` rows uniformly from the global batch, the same on every device.

    Under `shard_map`, device i contains rows `[i * N, (i + 1) * N)` of the global
    batch. Every device draws the same global row indices, fills in its own rows and
    leaves zeros elsewhere. A `psum` then assembles the `[num_draws, D]` result
    without gathering the whole batch.
    """
    num_local = z_e.shape[0]
    if axis_name is None:
        num_rows, offset = num_local, 0
    else:
        num_rows = num_local * lax.axis_size(axis_name)
        offset = lax.axis_index(axis_name) * num_local
    rows = jax.random.choice(key, num_rows, (num_draws,), replace=num_rows < num_draws)
    if axis_name is None:
        return z_e[rows]

    local_rows = rows - offset
    is_local = (local_rows >= 0) & (local_rows < num_local)
    drawn = z_e[jnp.clip(local_rows, 0, num_local - 1)]
    return lax.psum(jnp.where(is_local[:, None], drawn, 0.0), axis_name)


def restart_dead_codes(
    state: VQState,
    z_e: jax.Array,
    key: jax.Array,
    *,
    threshold: float,
    axis_name: str | None = None,
    l2_normalize: bool = False,
) -> tuple[VQState, jax.Array]:
    """Replace codes whose `cluster_size` is below `threshold` by encoder outputs.

    Each dead code gets a vector drawn uniformly from the batch, without replacement
    when the batch has at least K vectors. Its `cluster_size` becomes 1 and its
    `embed_sum` the new vector, so the state stays consistent. Live codes keep their
    values. All shapes are static, so the function runs under `jit`.

    Args:
      state: current statistics.
      z_e: `[..., D]` encoder outputs: the global batch under `jit`, or the local
        shard under `shard_map` with `axis_name`.
      key: PRNG key for the draw. Use the same key on every device.
      threshold: codes with `cluster_size < threshold` are restarted.
      axis_name: under `shard_map` or `pmap`, the mesh axis of the batch. The draw
        then covers the global batch, and every device restarts the same codes with
        the same vectors.
      l2_normalize: normalise the drawn vectors, for a normalised codebook.

    Returns:
      `(new_state, num_restarted)`, the second an int32 scalar.
    """
    num_codes, dim = state.codebook.shape
    chex.assert_axis_dimension(z_e, -1, dim)
    _check_range("threshold", threshold, 0.0)

    z_e = z_e.reshape(-1, dim).astype(jnp.float32)  # [N, D]
    candidates = _draw_rows(z_e, key, num_codes, axis_name)  # [K, D]
    if l2_normalize:
        candidates = _l2_normalize(candidates)

    dead = state.cluster_size < threshold  # [K]
    new_state = VQState(
        codebook=jnp.where(dead[:, None], candidates, state.codebook),
        cluster_size=jnp.where(dead, 1.0, state.cluster_size),
        embed_sum=jnp.where(dead[:, None], candidates, state.embed_sum),
    )
    return new_state, jnp.sum(dead).astype(jnp.int32)
