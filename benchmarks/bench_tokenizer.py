"""Benchmark the VQ-VAE tokenizer train step against a PyTorch reference.

Two configurations: the default MNIST tokenizer (experiments/configs/tokenizer_mnist.py,
batch 64 of 28x28x1, f4) and an f8 variant on 64x64x3 images (channel_mult
(1, 2, 2, 4), 1024 codes, batch 32). vqdiff_jax runs `tokenizer.make_train_step` jitted with
the state donated, as experiments/train_tokenizer.py does. PyTorch runs
`torch_reference.TokenizerTrainer`, the same architecture, losses, AdamW with
clipping and EMA codebook, in eager mode with NCHW and with channels-last tensors.

Run from the repository root:
  .venv/bin/python benchmarks/bench_tokenizer.py
"""

from __future__ import annotations

import argparse
import time

import common  # Sets OMP_WAIT_POLICY before torch is imported.
import jax
import numpy as np
import torch
import torch_reference

from experiments.configs import tokenizer_mnist
from vqdiff_jax import parallel, tokenizer
from vqdiff_jax.models.vqvae import make_vqvae
from vqdiff_jax.train_state import make_optimizer


def _configs():
    """Return the benchmarked tokenizer configurations."""
    mnist = tokenizer_mnist.get_config()
    f8 = tokenizer_mnist.get_config()
    f8.model.channel_mult = (1, 2, 2, 4)  # Three downsamplings: 64x64 -> 8x8.
    f8.vq.num_codes = 1024
    f8.batch_size = 32  # Keeps the script near a minute on 2 cores.
    # {name: (config, image shape, timed steps, warm-up steps)}
    return {
        "MNIST f4, 28x28x1": (mnist, (28, 28, 1), 5, 2),
        "f8, 64x64x3": (f8, (64, 64, 3), 3, 1),
    }


def _images(batch_size: int, image_shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1.0, 1.0, size=(batch_size, *image_shape)).astype(np.float32)


def build_jax(config, image_shape):
    """Return (step function that blocks, compile seconds)."""
    model = make_vqvae(config.model, image_shape[-1])
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    # Built under jit, as vqdiff_jax.trainer does: every leaf of the state then has its
    # own buffer, which donation requires.
    state = jax.jit(
        lambda: tokenizer.init_state(model, config.vq, tx, jax.random.key(0), image_shape))()
    batch = {"image": jax.numpy.asarray(_images(config.batch_size, image_shape))}
    step_fn = jax.jit(
        tokenizer.make_train_step(model, config.vq, tx, seed=0), donate_argnums=0,
        compiler_options=parallel.conv_compiler_options())
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    return step, compile_seconds


def build_torch(config, image_shape, channels_last: bool):
    torch.manual_seed(0)
    m = config.model
    model = torch_reference.VQVAE(
        image_channels=image_shape[-1], channels=m.channels, channel_mult=m.channel_mult,
        num_res_blocks=m.num_res_blocks, latent_dim=m.latent_dim, norm_groups=m.norm_groups)
    trainer = torch_reference.TokenizerTrainer(
        model, num_codes=config.vq.num_codes, latent_dim=m.latent_dim,
        learning_rate=config.optimizer.learning_rate,
        commitment_weight=config.vq.commitment_weight, decay=config.vq.ema_decay,
        eps=config.vq.ema_eps, channels_last=channels_last)
    images = torch.from_numpy(_images(config.batch_size, image_shape)).permute(0, 3, 1, 2)
    return lambda: trainer.step(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()

    common.print_header("Tokenizer train step (EMA codebook, AdamW)")
    rows = []
    for name, (config, image_shape, rounds, warmup) in _configs().items():
        jax_step, compile_seconds = build_jax(config, image_shape)
        steps = {
            "vqdiff_jax": jax_step,
            "PyTorch eager, NCHW": build_torch(config, image_shape, channels_last=False),
            "PyTorch eager, channels_last": build_torch(config, image_shape, channels_last=True),
        }
        times = common.time_interleaved(steps, rounds=rounds, warmup=warmup)
        for impl, seconds in times.items():
            rows.append([
                name, config.batch_size, impl, common.fmt_ms(seconds),
                f"{config.batch_size / seconds:.0f}",
                common.fmt_ratio(seconds / times["vqdiff_jax"]),
                f"{compile_seconds:.1f}" if impl == "vqdiff_jax" else "-",
            ])
    common.print_table(
        ["config", "batch", "implementation", "step ms", "images/s", "time / vqdiff_jax",
         "compile s"],
        rows)


if __name__ == "__main__":
    main()
