"""Convolutional VQ-VAE encoder and decoder (Flax Linen).

The quantizer itself is not part of these modules: it is the set of pure
functions in `vqdiff_jax.quantizer`, applied by the trainer between `encode` and
`decode`. That keeps the codebook EMA statistics out of the parameters, so they
never pass through the optimizer.

Images are float32 in [-1, 1] with layout [batch, height, width, channels].
"""

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiff_jax import quantizer


def _group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    groups = max_groups
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice."""

    channels: int
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(x.shape[-1], self.norm_groups)(x))
        h = nn.Conv(self.channels, (3, 3))(h)
        h = nn.silu(_group_norm(self.channels, self.norm_groups)(h))
        h = nn.Conv(self.channels, (3, 3))(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), name="skip")(x)
        return x + h


class Upsample2x(nn.Module):
    """Sub-pixel upsampling: a 3x3 conv to 4x channels, then depth-to-space.

    On CPU this is several times faster than `nn.ConvTranspose` for the same
    output size (forward and backward), and it has no checkerboard bias at init.
    """

    channels: int

    @nn.compact
    def __call__(self, x):
        b, h, w, _ = x.shape
        x = nn.Conv(4 * self.channels, (3, 3))(x)  # [B, h, w, 4C]
        x = x.reshape(b, h, w, 2, 2, self.channels)
        x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, 2, w, 2, C]
        return x.reshape(b, 2 * h, 2 * w, self.channels)


class Encoder(nn.Module):
    """Maps images [B, H, W, C] to latents [B, H/f, W/f, latent_dim], f = 2**(levels-1)."""

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    latent_dim: int
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.channels, (3, 3))(x)
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, self.norm_groups)(h)
            if level < len(self.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)  # [B, h/2, w/2, C]
        h = ResBlock(h.shape[-1], self.norm_groups)(h)
        h = nn.silu(_group_norm(h.shape[-1], self.norm_groups)(h))
        return nn.Conv(self.latent_dim, (1, 1))(h)


class Decoder(nn.Module):
    """Maps latents [B, h, w, latent_dim] to images [B, h*f, w*f, out_channels]."""

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    norm_groups: int = 32

    @nn.compact
    def __call__(self, z):
        mults = tuple(reversed(self.channel_mult))
        h = nn.Conv(self.channels * mults[0], (3, 3))(z)
        h = ResBlock(h.shape[-1], self.norm_groups)(h)
        for level, mult in enumerate(mults):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, self.norm_groups)(h)
            if level < len(mults) - 1:
                h = Upsample2x(h.shape[-1])(h)
        h = nn.silu(_group_norm(h.shape[-1], self.norm_groups)(h))
        return nn.Conv(self.out_channels, (3, 3))(h)


class VQVAE(nn.Module):
    """Encoder and decoder of a VQ-VAE, with an optional low-dimensional code lookup.

    `encode` returns the vectors that are quantized: [B, h, w, code_dim], where
    code_dim is `lookup_dim` when set (a linear projection of the latent, as in
    factorized codes) and `latent_dim` otherwise; with `l2_normalize` they are
    unit vectors. `decode` takes quantized vectors of the same shape, projects
    them back to `latent_dim` and decodes.
    """

    image_channels: int
    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    latent_dim: int
    lookup_dim: int | None = None
    l2_normalize: bool = False
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def code_dim(self) -> int:
        return self.lookup_dim or self.latent_dim

    def setup(self):
        if self.latent_dim < 1:
            raise ValueError(
                f"latent_dim must be >= 1, got {self.latent_dim}. Set model.latent_dim to the "
                "number of latent channels, e.g. 8.")
        if self.lookup_dim is not None and self.lookup_dim < 1:
            raise ValueError(
                    f"lookup_dim must be >= 1 or None, got {self.lookup_dim}; use None to quantize "
                    "the latent directly.")
        self.encoder = Encoder(self.channels, self.channel_mult, self.num_res_blocks,
                                                      self.latent_dim, self.norm_groups)
        self.decoder = Decoder(self.channels, self.channel_mult, self.num_res_blocks,
                                                      self.image_channels, self.norm_groups)
        if self.lookup_dim is not None:
            self.project_in = nn.Dense(self.lookup_dim)
            self.project_out = nn.Dense(self.latent_dim)

    def check_images(self, x):
        """Raise a ValueError for images the model cannot take; x is [B, H, W, C]."""
        if x.ndim != 4:
            raise ValueError(f"Expected images of shape [batch, height, width, channels], got {x.shape}.")
        _, height, width, channels = x.shape
        if channels != self.image_channels:
            raise ValueError(
                    f"The model expects {self.image_channels} image channel(s), got images of shape "
                    f"{x.shape}; set model.image_channels={channels} or convert the images.")
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                    f"Image size {height}x{width} is not divisible by the downsampling factor {f} "
                    f"(channel_mult={tuple(self.channel_mult)}); resize the images to a multiple of {f} "
                    "or use fewer levels in model.channel_mult.")

    def encode(self, x):
        """Encode images [B, H, W, C] to pre-quantization vectors z_e [B, h, w, code_dim]."""
        self.check_images(x)
        z_e = self.encoder(x)
        if self.lookup_dim is not None:
            z_e = self.project_in(z_e)
        if self.l2_normalize:
            z_e = quantizer.l2_normalize(z_e)
        return z_e

    def decode(self, z_q):
        """Decode quantized vectors [B, h, w, code_dim] to images [B, H, W, C]."""
        chex.assert_rank(z_q, 4)
        if self.lookup_dim is not None:
            z_q = self.project_out(z_q)
        return self.decoder(z_q)

    def __call__(self, x):
        """Encode and decode without quantization (used only to create all parameters)."""
        return self.decode(self.encode(x))


def make_vqvae(model_config, image_channels: int) -> VQVAE:
    """Build the VQ-VAE from the `model` block of a tokenizer config."""
    return VQVAE(
            image_channels=image_channels,
            channels=model_config.channels,
            channel_mult=tuple(model_config.channel_mult),
            num_res_blocks=model_config.num_res_blocks,
            latent_dim=model_config.latent_dim,
            lookup_dim=model_config.lookup_dim,
            l2_normalize=model_config.l2_normalize,
            norm_groups=model_config.norm_groups,
    )


def init_params(model: VQVAE, key: jax.Array, image_shape) -> dict:
    """Initialise parameters for images of shape [H, W, C]."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
