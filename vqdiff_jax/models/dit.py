"""Diffusion Transformer (DiT) in Flax Linen.

The model is the one of Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023).
The module and parameter names follow the authors' PyTorch `models.py` (`x_embedder`,
`t_embedder`, `y_embedder`, `blocks_{i}`, `final_layer`, `adaLN_modulation`), so a reader of
that file finds the same pieces here. Differences from that file:

- Inputs and outputs are channels-last, [batch, height, width, channels].
- Non-square latents work: the position embedding is built from the patch grid's height and
  width, not from the square root of the token count.
- The null label of classifier-free guidance is always `num_classes`, read from the module's
  field. The label table has `num_classes + 1` rows even when class_dropout_prob is 0, so
  the null label always has an embedding.
- The patch embedding is a Dense layer on flattened patches, which equals a stride-p
  convolution, with each patch flattened as (row in patch, column in patch, channel).

The model is a pure Linen module: `init` and `apply` take explicit RNG keys. Label dropout
reads the Linen RNG stream named 'label_drop'.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

# Initialisers of the reference: xavier_uniform for every Dense, normal(0.02) for the
# timestep MLP and the label table, zeros for biases and for the adaLN-Zero layers.
_xavier = nn.initializers.xavier_uniform()
_normal_002 = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros

_LAYER_NORM_EPS = 1e-6


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Apply the adaLN affine map `x * (1 + scale) + shift` per sample.

    Args:
      x: tokens [batch, tokens, hidden].
      shift: [batch, hidden].
      scale: [batch, hidden].
    """
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ------------------------------------------------------------------------------------------
# Embedders: timesteps and class labels to vectors of size hidden_size.
# ------------------------------------------------------------------------------------------


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Embed scalar timesteps with sinusoids, cosines first, as in the reference.

    Frequencies are `max_period ** (-k / half)` for k in [0, half), half = dim // 2. An odd
    `dim` gets one trailing zero. Computed in float32 whatever the model's compute dtype,
    because bfloat16 cannot resolve the phase of timesteps in the hundreds.

    Args:
      t: timesteps [batch], integer or float (fractional values are allowed).
      dim: embedding size.
      max_period: longest period of the sinusoids, in timestep units.

    Returns:
      [batch, dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [B, 2 * half]
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep embedding followed by a two-layer MLP with SiLU."""

    hidden_size: int
    frequency_embedding_size: int = 256
    max_period: float = 10000.0
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """Map timesteps [batch] to embeddings [batch, hidden_size]."""
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        h = nn.Dense(
            self.hidden_size, dtype=self.dtype, kernel_init=_normal_002, bias_init=_zeros,
            name="fc1",
        )(t_freq)
        h = nn.silu(h)
        return nn.Dense(
            self.hidden_size, dtype=self.dtype, kernel_init=_normal_002, bias_init=_zeros,
            name="fc2",
        )(h)


class LabelEmbedder(nn.Module):
    """Class-label embedding table with label dropout for classifier-free guidance.

    The table has `num_classes + 1` rows. Row `num_classes` is the null label: the
    unconditional model. Callers may pass the null label directly (guidance sampling does).
    """

    num_classes: int
    hidden_size: int
    dropout_prob: float
    dtype: DTypeLike = jnp.float32

    @property
    def null_label(self) -> int:
        """Id of the null label, equal to `num_classes`."""
        return self.num_classes

    def drop_labels(
        self, y: jax.Array, train: bool, force_drop_ids: jax.Array | None = None
    ) -> jax.Array:
        """Replace dropped labels by the null label and return the labels to embed.

        With `force_drop_ids` given, exactly the samples where it is non-zero are dropped,
        in training or not. Otherwise, when `train` is True and `dropout_prob > 0`, each
        sample is dropped independently with probability `dropout_prob`, one Bernoulli
        draw per sample from the 'label_drop' stream. Nothing is dropped otherwise.

        Args:
          y: integer labels [batch].
          train: whether to draw random drops.
          force_drop_ids: optional [batch], non-zero where the label must be dropped.

        Returns:
          Labels [batch] with the same dtype as `y`.
        """
        if force_drop_ids is not None:
            drop = jnp.asarray(force_drop_ids).astype(bool)
        elif train and self.dropout_prob > 0:
            if not self.is_initializing() and not self.has_rng("label_drop"):
                raise ValueError(
                    "LabelEmbedder needs an RNG for label dropout when train=True and "
                    f"dropout_prob={self.dropout_prob} > 0. Pass "
                    "rngs={'label_drop': key} to apply, or call with train=False."
                )
            drop = jax.random.bernoulli(
                self.make_rng("label_drop"), self.dropout_prob, (y.shape[0],)
            )
        else:
            return y
        chex.assert_shape(drop, y.shape)
        return jnp.where(drop, jnp.asarray(self.null_label, y.dtype), y)

    @nn.compact
    def __call__(
        self, y: jax.Array, train: bool, force_drop_ids: jax.Array | None = None
    ) -> jax.Array:
        """Map labels [batch] to embeddings [batch, hidden_size], after label dropout."""
        y = self.drop_labels(y, train, force_drop_ids)
        table = nn.Embed(
            self.num_classes + 1, self.hidden_size, dtype=self.dtype,
            embedding_init=_normal_002, name="embedding_table",
        )
        return table(y)


def _token_dense(x: jax.Array, features: int, *, name: str, kernel_init, dtype: DTypeLike
                 ) -> jax.Array:
    """Apply a Dense layer to tokens [batch, tokens, in] through a [batch * tokens, in] view.

    Call it inside a compact method: the Dense layer gets `name` in the caller's scope.
    The forward product equals that of nn.Dense on the 3-D array. The weight gradient
    differs in how it compiles. For a 3-D input, XLA's CPU compiler made a transposed
    copy of dy and ran the gradient product in a slower matrix-product path. With the
    2-D view, a DiT-S/2 train step on 2 CPU cores went from 17.8 to 13.4 s
    (benchmarks/README.md).

    Returns:
      [batch, tokens, features].
    """
    leading_shape = x.shape[:-1]
    y = nn.Dense(features, dtype=dtype, kernel_init=kernel_init, bias_init=_zeros,
                 name=name)(x.reshape(-1, x.shape[-1]))
    return y.reshape(*leading_shape, features)


# ------------------------------------------------------------------------------------------
# Blocks: multi-head self-attention and MLP, both conditioned by adaLN-Zero.
# ------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    hidden_size: int
    num_heads: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Attend over tokens [batch, tokens, hidden] and return the same shape."""
        batch, tokens, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        qkv = _token_dense(x, 3 * self.hidden_size, name="qkv", kernel_init=_xavier,
                           dtype=self.dtype)  # [B, T, 3D]
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)  # [B, T, 3, N, H]
        # Heads go next to the batch axis before the two products. On 2 CPU cores this made a
        # DiT-S/2 train step 1 to 10 % faster than jax.nn.dot_product_attention on [B, T, N, H]
        # (benchmarks/README.md). Logits and softmax are float32 for every dtype.
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [B, N, T, H]
        # Scaling q, not the logits, keeps a [B, N, T, T] broadcast of the scale out of the
        # compiled step. For a head_dim that is a power of 4 the scale is a power of 2, so the
        # result equals that of scaling the logits bit for bit.
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        logits = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bnkh->bnqh", weights, v)  # [B, N, T, H]
        # A separate transpose, not an einsum output of [B, T, N, H]: XLA's CPU compiler then
        # keeps one more batched product in its faster form (DiT-S/2 step 0.7 to 4 % faster).
        out = jnp.transpose(out, (0, 2, 1, 3))  # [B, T, N, H]
        out = out.reshape(batch, tokens, self.hidden_size)  # [B, T, D]
        return _token_dense(out, self.hidden_size, name="proj", kernel_init=_xavier,
                            dtype=self.dtype)


class Mlp(nn.Module):
    """Two Dense layers with GELU (tanh approximation) between them."""

    hidden_size: int
    mlp_hidden_size: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _token_dense(x, self.mlp_hidden_size, name="fc1", kernel_init=_xavier,
                         dtype=self.dtype)
        h = nn.gelu(h, approximate=True)
        return _token_dense(h, self.hidden_size, name="fc2", kernel_init=_xavier,
                            dtype=self.dtype)


def _layer_norm(dtype: DTypeLike, name: str) -> nn.LayerNorm:
    """LayerNorm without learned scale or bias: adaLN supplies both."""
    return nn.LayerNorm(
        epsilon=_LAYER_NORM_EPS, use_bias=False, use_scale=False, dtype=dtype, name=name
    )


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    The conditioning vector c gives a shift, a scale and a gate for each of the attention
    and MLP branches. Their Dense layer starts at zero, so every gate starts at zero and
    the block starts as the identity map.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """Update tokens [batch, tokens, hidden] given conditioning c [batch, hidden]."""
        modulation = nn.Dense(6 * self.hidden_size, dtype=self.dtype, kernel_init=_zeros,
                              bias_init=_zeros, name="adaLN_modulation")(nn.silu(c))
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = jnp.split(modulation, 6, axis=-1)  # each [B, D]

        h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        h = Attention(self.hidden_size, self.num_heads, dtype=self.dtype, name="attn")(h)
        x = x + gate_msa[:, None, :] * h

        h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        mlp_hidden_size = int(self.hidden_size * self.mlp_ratio)
        h = Mlp(self.hidden_size, mlp_hidden_size, dtype=self.dtype, name="mlp")(h)
        return x + gate_mlp[:, None, :] * h


# ------------------------------------------------------------------------------------------
# Final layer: adaLN, then a projection of each token to one patch of the output.
# ------------------------------------------------------------------------------------------


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a zero-initialised Dense to patch*patch*out_channels."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """Map tokens [batch, tokens, hidden] to [batch, tokens, p*p*out_channels]."""
        modulation = nn.Dense(2 * self.hidden_size, dtype=self.dtype, kernel_init=_zeros,
                              bias_init=_zeros, name="adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(modulation, 2, axis=-1)  # each [B, D]
        x = modulate(_layer_norm(self.dtype, "norm_final")(x), shift, scale)
        out_features = self.patch_size * self.patch_size * self.out_channels
        return _token_dense(x, out_features, name="linear", kernel_init=_zeros,
                            dtype=self.dtype)


# ------------------------------------------------------------------------------------------
# Model: patchify, embed, blocks, final layer, unpatchify.
# ------------------------------------------------------------------------------------------


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """Cut images into non-overlapping patches and flatten each patch.

    Tokens come in row-major order over the patch grid. Each token is flattened as
    (row inside the patch, column inside the patch, channel).

    Args:
      x: [batch, height, width, channels], height and width divisible by patch_size.
      patch_size: patch side p.

    Returns:
      [batch, (height/p) * (width/p), p * p * channels].
    """
    b, h, w, c = x.shape
    p = patch_size
    _check_divisible(h, w, p)
    x = x.reshape(b, h // p, p, w // p, p, c)  # [B, h, p, w, p, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int,
               channels: int) -> jax.Array:
    """Reassemble patch tokens into images: the exact inverse of `patchify`.

    Args:
      tokens: [batch, (height/p) * (width/p), p * p * channels].
      patch_size: patch side p.
      height, width: image size in pixels (latent positions), divisible by p.
      channels: channels per pixel.

    Returns:
      [batch, height, width, channels].
    """
    p = patch_size
    _check_divisible(height, width, p)
    grid_h, grid_w = height // p, width // p
    chex.assert_shape(tokens, (None, grid_h * grid_w, p * p * channels))
    b = tokens.shape[0]
    x = tokens.reshape(b, grid_h, grid_w, p, p, channels)  # [B, h, w, p, p, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
    return x.reshape(b, height, width, channels)


def _check_divisible(height: int, width: int, patch_size: int) -> None:
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}.")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Latent height {height} and width {width} must both be divisible by "
            f"patch_size {patch_size}. Use a patch size that divides both, or crop or pad "
            "the latent."
        )


def check_labels(y, num_classes: int) -> None:
    """Raise ValueError unless every label is an integer in [0, num_classes].

    `num_classes` itself is allowed: it is the null label of classifier-free guidance.
    Call this on host data (numpy arrays or concrete JAX arrays). Inside `jax.jit` the
    values are unknown, and an out-of-range label gives NaN embeddings instead of an error
    (`jnp.take` fills out-of-bounds rows with NaN).

    Args:
      y: labels, any shape.
      num_classes: number of real classes.
    """
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"Labels must be integers, got dtype {y.dtype}. Cast them to int32.")
    if y.size == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high > num_classes:
        raise ValueError(
            f"Labels must lie in [0, {num_classes}], where {num_classes} is the null label "
            f"(num_classes={num_classes}), got min {low} and max {high}. Remap the labels "
            "to 0..num_classes-1 or raise num_classes."
        )


class DiT(nn.Module):
    """Class-conditional Diffusion Transformer on latents [batch, height, width, channels].

    Attributes:
      patch_size: side of the square patches; height and width must be divisible by it.
      hidden_size: token width D.
      depth: number of DiT blocks.
      num_heads: attention heads; must divide hidden_size.
      mlp_ratio: MLP hidden width as a multiple of hidden_size.
      num_classes: number of real classes. Label `num_classes` is the null label.
      class_dropout_prob: probability of replacing a label by the null label in training.
      learn_sigma: if True, the output has twice the input channels (noise and variance).
      dtype: compute dtype. Parameters are always float32 and the output is float32.
    """

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    num_classes: int
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        *,
        train: bool,
        force_drop_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Predict noise (and variance with learn_sigma) for noisy latents.

        Args:
          x: noisy latents x_t [batch, height, width, channels].
          t: timesteps [batch], integer or float.
          y: integer labels [batch] in [0, num_classes]; num_classes is the null label.
          train: draw label drops from the 'label_drop' RNG stream. Set it to False for
            evaluation and sampling.
          force_drop_ids: optional [batch], non-zero where the label is replaced by the
            null label, in training or not.

        Returns:
          [batch, height, width, out_channels] float32, where out_channels is channels,
          or 2 * channels with learn_sigma.
        """
        self._check_inputs(x, t, y)
        _, h, w, channels = x.shape
        p = self.patch_size
        out_channels = 2 * channels if self.learn_sigma else channels
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, h // p, w // p)  # [T, D]

        x = patchify(x, p)  # [B, T, p*p*C]
        x = _token_dense(x, self.hidden_size, name="x_embedder", kernel_init=_xavier,
                         dtype=self.dtype)  # [B, T, D]
        x = x + jnp.asarray(pos_embed, dtype=x.dtype)[None]  # [B, T, D]
        t_embedder = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder")
        y_embedder = LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob,
                                   dtype=self.dtype, name="y_embedder")
        t_emb = t_embedder(t)  # [B, D]
        y_emb = y_embedder(y, train, force_drop_ids)  # [B, D]
        c = t_emb + y_emb  # [B, D]
        for i in range(self.depth):
            x = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                         name=f"blocks_{i}")(x, c)  # [B, T, D]
        x = FinalLayer(self.hidden_size, p, out_channels, dtype=self.dtype,
                       name="final_layer")(x, c)  # [B, T, p*p*C_out]
        x = unpatchify(x, p, h, w, out_channels)  # [B, H, W, C_out]
        return x.astype(jnp.float32)  # [B, H, W, C_out]

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        chex.assert_rank(x, 4)
        chex.assert_shape([t, y], (x.shape[0],))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads "
                f"{self.num_heads}. Pick a head count that divides it."
            )
        _check_divisible(x.shape[1], x.shape[2], self.patch_size)
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"Labels y must be integers, got dtype {y.dtype}. Cast to int32.")
        # Values are only known outside tracing (plain apply, init); under jit, see check_labels.
        if not isinstance(y, jax.core.Tracer):
            check_labels(y, self.num_classes)


# ------------------------------------------------------------------------------------------
# Position embeddings: fixed 2-D sine-cosine tables, computed in float64 with numpy.
# ------------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """Embed positions with sines then cosines at frequencies 10000 ** (-k / (embed_dim/2)).

    Args:
      embed_dim: output width, even.
      positions: [n] positions.

    Returns:
      [n, embed_dim] float64.
    """
    if embed_dim % 2:
        raise ValueError(
            f"embed_dim must be even for a 1-D sine-cosine embedding, got {embed_dim}."
        )
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [embed_dim/2]
    positions = np.asarray(positions, dtype=np.float64).reshape(-1)  # [n]
    angles = np.outer(positions, omega)  # [n, embed_dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Build the fixed position embedding of a grid_h x grid_w patch grid.

    Tokens are in row-major order, as `patchify` makes them. The first embed_dim/2 values
    of a token encode its column index and the last embed_dim/2 its row index, in the same
    order as the reference (MAE) code. Each half is `get_1d_sincos_pos_embed`.

    Args:
      embed_dim: token width, divisible by 4.
      grid_h: patch rows.
      grid_w: patch columns.

    Returns:
      [grid_h * grid_w, embed_dim] float64.
    """
    if embed_dim % 4:
        raise ValueError(
            f"embed_dim must be divisible by 4 for a 2-D sine-cosine embedding, got "
            f"{embed_dim}. Choose a hidden_size that is a multiple of 4."
        )
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")  # [gh, gw]
    col_embed = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))  # [T, D/2]
    row_embed = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))  # [T, D/2]
    return np.concatenate([col_embed, row_embed], axis=1)


# ------------------------------------------------------------------------------------------
# Size presets: the S, B, L and XL models of Peebles & Xie (2023), and a tiny model for tests.
# ------------------------------------------------------------------------------------------

# (hidden_size, depth, num_heads, patch sizes)
_DIT_SIZES = {
    "S": (384, 12, 6, (1, 2, 4, 8)),
    "B": (768, 12, 12, (1, 2, 4, 8)),
    "L": (1024, 24, 16, (1, 2, 4, 8)),
    "XL": (1152, 28, 16, (1, 2, 4, 8)),
    "Tiny": (64, 2, 2, (1, 2)),
}

DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch_size}": {
        "hidden_size": hidden_size,
        "depth": depth,
        "num_heads": num_heads,
        "patch_size": patch_size,
    }
    for size, (hidden_size, depth, num_heads, patch_sizes) in _DIT_SIZES.items()
    for patch_size in patch_sizes
}


def dit_from_preset(
    name: str,
    *,
    num_classes: int,
    learn_sigma: bool = False,
    class_dropout_prob: float = 0.1,
    dtype: DTypeLike = jnp.float32,
) -> DiT:
    """Build a DiT from a preset name such as 'DiT-XL/2' (size, then patch size)."""
    if name not in DIT_CONFIGS:
        raise ValueError(
            f"Unknown DiT preset {name!r}. Known presets: {', '.join(DIT_CONFIGS)}."
        )
    return DiT(
        **DIT_CONFIGS[name],
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        dtype=dtype,
    )
