"""PyTorch versions of the vqdiff_jax computations, written for the benchmarks.

Each piece does the same arithmetic as its vqdiff_jax counterpart (same layers,
widths, losses and optimizer) so that the timings compare implementations, not
models. They are written for speed in PyTorch eager mode and are not used for
training.

- Quantizer: `nearest_codes_cdist` (torch.cdist then argmin) and `ema_update`
  (the update of `vqdiff_jax.quantizer.ema_update`, with bincount and index_add_).
- Tokenizer: `VQVAE` mirrors `vqdiff_jax.models.vqvae.VQVAE`, and
  `TokenizerTrainer.step` mirrors `vqdiff_jax.tokenizer.make_train_step` with an EMA
  codebook, without the dead-code restart and the logged metrics.
- DiT: `DiT` mirrors `vqdiff_jax.models.dit.DiT` (adaLN-Zero blocks, fused qkv,
  GELU with the tanh approximation), and `DiTTrainer.step` mirrors
  `vqdiff_jax.latent_diffusion.make_train_step` (eps prediction, AdamW, gradient
  clipping, weight EMA).
- Sampling: `ddim_sample` runs deterministic DDIM with classifier-free guidance on
  the doubled batch, as `vqdiff_jax.diffusion.guided_model_fn` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------


def nearest_codes_cdist(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Return the index of the nearest code for each row of z `[N, D]`, as int64 `[N]`."""
    return torch.cdist(z, codebook).argmin(dim=-1)


def ema_update(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    z: torch.Tensor,
    codes: torch.Tensor,
    *,
    decay: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the EMA codebook update in place; return (cluster_size, embed_sum, codebook)."""
    num_codes = cluster_size.shape[0]
    counts = torch.bincount(codes, minlength=num_codes).to(z.dtype)
    sums = torch.zeros_like(embed_sum).index_add_(0, codes, z)
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


# --------------------------------------------------------------------------------------
# VQ-VAE tokenizer
# --------------------------------------------------------------------------------------


def _group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    groups = max_groups
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, norm_groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm2 = _group_norm(channels, norm_groups)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, channels, 1) if in_channels != channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class Upsample2x(nn.Module):
    """A 3x3 conv to 4x channels, then pixel shuffle, as the JAX `Upsample2x`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


class VQVAE(nn.Module):
    """Encoder and decoder of the JAX `VQVAE` (no lookup projection, no normalisation)."""

    def __init__(self, image_channels: int, channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, latent_dim: int, norm_groups: int):
        super().__init__()
        encoder = [nn.Conv2d(image_channels, channels, 3, padding=1)]
        width = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                encoder.append(ResBlock(width, channels * mult, norm_groups))
                width = channels * mult
            if level < len(channel_mult) - 1:
                encoder.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        encoder += [ResBlock(width, width, norm_groups), _group_norm(width, norm_groups),
                    nn.SiLU(), nn.Conv2d(width, latent_dim, 1)]
        self.encoder = nn.Sequential(*encoder)

        mults = tuple(reversed(channel_mult))
        width = channels * mults[0]
        decoder = [nn.Conv2d(latent_dim, width, 3, padding=1), ResBlock(width, width, norm_groups)]
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                decoder.append(ResBlock(width, channels * mult, norm_groups))
                width = channels * mult
            if level < len(mults) - 1:
                decoder.append(Upsample2x(width))
        decoder += [_group_norm(width, norm_groups), nn.SiLU(),
                    nn.Conv2d(width, image_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)


class TokenizerTrainer:
    """One optimizer step of the VQ-VAE with an EMA codebook, in PyTorch.

    The step follows `vqdiff_jax.tokenizer.make_train_step`: encode, nearest code in
    the current codebook, straight-through decoder input, reconstruction plus
    commitment loss, AdamW with global-norm clipping, then the EMA update.
    """

    def __init__(self, model: VQVAE, *, num_codes: int, latent_dim: int, learning_rate: float,
                 commitment_weight: float, decay: float, eps: float,
                 channels_last: bool = False):
        self.model = model
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.0,
            foreach=True)
        self.codebook = torch.randn(num_codes, latent_dim)
        self.cluster_size = torch.ones(num_codes)
        self.embed_sum = self.codebook.clone()
        self.commitment_weight, self.decay, self.eps = commitment_weight, decay, eps

    def step(self, images: torch.Tensor) -> float:
        """Train on images `[B, C, H, W]` and return the loss."""
        images = images.contiguous(memory_format=self.memory_format)
        z_e = self.model.encoder(images)  # [B, D, h, w]
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # [N, D]
        with torch.no_grad():
            codes = nearest_codes_cdist(flat, self.codebook)
        z_q = self.codebook[codes]  # [N, D]
        commitment = F.mse_loss(flat, z_q)
        # Straight-through: the decoder gets z_q in the forward pass, z_e the gradient.
        z_st = flat + (z_q - flat).detach()
        z_st = z_st.reshape(z_e.shape[0], z_e.shape[2], z_e.shape[3], -1).permute(0, 3, 1, 2)
        recon = self.model.decoder(z_st.contiguous(memory_format=self.memory_format))
        loss = F.mse_loss(recon, images) + self.commitment_weight * commitment

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        with torch.no_grad():
            _, _, self.codebook = ema_update(
                self.cluster_size, self.embed_sum, flat.detach(), codes,
                decay=self.decay, eps=self.eps)
        return loss.item()


# --------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        self.adaLN_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, x, c):
        b, t, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(F.silu(c)).chunk(6, dim=-1))
        h = _modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.qkv(h).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, head_dim]
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + gate_msa[:, None] * self.proj(h)
        h = _modulate(self.norm2(x), shift_mlp, scale_mlp)
        h = self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        return x + gate_mlp[:, None] * h


def _sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    def one_axis(dim, positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.concatenate(
        [one_axis(embed_dim // 2, cols), one_axis(embed_dim // 2, rows)], axis=1)


class DiT(nn.Module):
    """Class-conditional DiT on channels-last latents `[B, H, W, C]`, as the JAX `DiT`."""

    def __init__(self, *, input_size: tuple[int, int, int], patch_size: int, hidden_size: int,
                 depth: int, num_heads: int, num_classes: int, mlp_ratio: float = 4.0):
        super().__init__()
        height, width, channels = input_size
        self.patch_size, self.input_size = patch_size, input_size
        self.x_embedder = nn.Linear(patch_size * patch_size * channels, hidden_size)
        pos = _sincos_2d(hidden_size, height // patch_size, width // patch_size)
        self.register_buffer("pos_embed", torch.tensor(pos, dtype=torch.float32)[None])
        self.t_fc1 = nn.Linear(256, hidden_size)
        self.t_fc2 = nn.Linear(hidden_size, hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * channels)

    def forward(self, x, t, y):
        b, h, w, c = x.shape
        p = self.patch_size
        x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        x = self.x_embedder(x.reshape(b, -1, p * p * c)) + self.pos_embed  # [B, T, D]
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 256]
        c_vec = self.t_fc2(F.silu(self.t_fc1(t_freq))) + self.y_embedder(y)  # [B, D]
        for block in self.blocks:
            x = block(x, c_vec)
        shift, scale = self.final_modulation(F.silu(c_vec)).chunk(2, dim=-1)
        x = self.final_linear(_modulate(self.norm_final(x), shift, scale))  # [B, T, p*p*C]
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, c)


def linear_alphas_cumprod(num_timesteps: int = 1000) -> torch.Tensor:
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


class DiTTrainer:
    """One optimizer step of the DiT with eps prediction, in PyTorch.

    Follows `vqdiff_jax.latent_diffusion.make_train_step`: random timesteps and
    noise, label dropout to the null label, MSE on the noise, AdamW with global-norm
    clipping, then the weight EMA.
    """

    def __init__(self, model: DiT, *, num_classes: int, learning_rate: float = 1e-3,
                 class_dropout_prob: float = 0.1, ema_decay: float = 0.999):
        self.model = model
        self.ema = [p.detach().clone() for p in model.parameters()]
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.0,
            foreach=True)
        self.alphas_cumprod = linear_alphas_cumprod()
        self.num_classes, self.dropout, self.ema_decay = num_classes, class_dropout_prob, ema_decay

    def step(self, x_0: torch.Tensor, y: torch.Tensor) -> float:
        """Train on latents `[B, H, W, C]` and labels `[B]`; return the loss."""
        b = x_0.shape[0]
        t = torch.randint(0, self.alphas_cumprod.shape[0], (b,))
        eps = torch.randn_like(x_0)
        a = self.alphas_cumprod[t].reshape(b, 1, 1, 1)
        x_t = a.sqrt() * x_0 + (1 - a).sqrt() * eps
        y = torch.where(torch.rand(b) < self.dropout, self.num_classes, y)
        loss = F.mse_loss(self.model(x_t, t, y), eps)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        with torch.no_grad():
            params = [p.detach() for p in self.model.parameters()]
            torch._foreach_lerp_(self.ema, params, 1.0 - self.ema_decay)
        return loss.item()


@torch.inference_mode()
def ddim_sample(model: DiT, labels: torch.Tensor, *, num_steps: int, guidance_scale: float,
                num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with classifier-free guidance, `linspace` spacing."""
    alphas_cumprod = linear_alphas_cumprod()
    timesteps = np.round(np.linspace(0, len(alphas_cumprod) - 1, num_steps)).astype(np.int64)
    timesteps = timesteps[::-1]
    b = labels.shape[0]
    x = torch.randn((b, *model.input_size), generator=generator)
    y_both = torch.cat([labels, torch.full_like(labels, num_classes)])
    for i, t in enumerate(timesteps):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < num_steps else torch.tensor(1.0)
        t_both = torch.full((2 * b,), int(t), dtype=torch.long)
        out_cond, out_uncond = model(torch.cat([x, x]), t_both, y_both).chunk(2)
        eps = out_uncond + guidance_scale * (out_cond - out_uncond)
        x0_pred = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0_pred + (1 - a_prev).sqrt() * eps
    return x
