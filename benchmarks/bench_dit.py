"""Benchmark the DiT train step against a PyTorch eager reference.

Two models: DiT-S/2 on 32x32x4 latents with batch 32 (1000 classes), and the
default MNIST DiT of experiments/configs/dit_mnist.py on 7x7x8 latents with batch
128. vqdiff_jax runs `latent_diffusion.make_train_step` jitted with the state
donated, as experiments/train_dit.py does. PyTorch runs `torch_reference.DiTTrainer`
(same blocks, loss, AdamW with clipping and weight EMA).

The FLOPs of one step come from XLA's cost analysis of the compiled JAX step, and
the same count is used for both implementations. The float32 matmul peak is the best
rate of a 2048x2048 `jnp.dot` in the same run, before and after the timed steps.

Run from the repository root:
  .venv/bin/python benchmarks/bench_dit.py
"""

from __future__ import annotations

import argparse
import time

import common  # Sets OMP_WAIT_POLICY before torch is imported.
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch_reference

from experiments.configs import dit_mnist
from vqdiff_jax import latent_diffusion
from vqdiff_jax.train_state import make_optimizer


def _cases():
    """Return {name: (config, latent_shape, num_classes, rounds)}."""
    small = dit_mnist.get_config()
    dit_s2 = dit_mnist.get_config()
    dit_s2.model.preset = "DiT-S/2"
    dit_s2.batch_size = 32
    # DiT-S/2 steps take seconds on 2 cores: time only 2 of them after one warm-up.
    return {
        "DiT-S/2, 32x32x4": (dit_s2, (32, 32, 4), 1000, 2),
        "MNIST DiT, 7x7x8": (small, (7, 7, 8), 10, 10),
    }


def _batch(config, latent_shape, num_classes):
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(config.batch_size, *latent_shape)).astype(np.float32)
    label = rng.integers(0, num_classes, size=(config.batch_size,)).astype(np.int32)
    return latent, label


def build_jax(config, latent_shape, num_classes):
    """Return (step that blocks, FLOPs per step, compile seconds)."""
    model = latent_diffusion.make_dit(config.model, num_classes)
    schedule = latent_diffusion.make_schedule(config.diffusion)
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    state = jax.jit(
        lambda: latent_diffusion.init_state(model, tx, jax.random.key(0), latent_shape))()
    latent, label = _batch(config, latent_shape, num_classes)
    batch = {"latent": jnp.asarray(latent), "label": jnp.asarray(label)}
    step_fn = jax.jit(
        latent_diffusion.make_train_step(
            model, schedule, config.diffusion, tx, seed=0, ema_decay=config.ema_decay),
        donate_argnums=0)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    return step, common.compiled_flops(compiled), compile_seconds


def build_torch(config, latent_shape, num_classes):
    torch.manual_seed(0)
    m = config.model
    if m.preset:
        from vqdiff_jax.models.dit import DIT_CONFIGS

        sizes = DIT_CONFIGS[m.preset]
    else:
        sizes = {"patch_size": m.patch_size, "hidden_size": m.hidden_size,
                 "depth": m.depth, "num_heads": m.num_heads}
    model = torch_reference.DiT(input_size=latent_shape, num_classes=num_classes,
                                mlp_ratio=m.mlp_ratio, **sizes)
    trainer = torch_reference.DiTTrainer(
        model, num_classes=num_classes, learning_rate=config.optimizer.learning_rate,
        class_dropout_prob=m.class_dropout_prob, ema_decay=config.ema_decay)
    latent, label = _batch(config, latent_shape, num_classes)
    latent, label = torch.from_numpy(latent), torch.from_numpy(label).long()
    return lambda: trainer.step(latent, label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()

    common.print_header("DiT train step (eps prediction, AdamW, weight EMA)")
    # The peak is measured before and after the steps, and the higher rate is used.
    peak_before = common.matmul_peak_flops()
    measured = []
    for name, (config, latent_shape, num_classes, rounds) in _cases().items():
        jax_step, flops, compile_seconds = build_jax(config, latent_shape, num_classes)
        steps = {"vqdiff_jax": jax_step,
                 "PyTorch eager": build_torch(config, latent_shape, num_classes)}
        times = common.time_interleaved(steps, rounds=rounds, warmup=1)
        measured.append((name, config.batch_size, flops, compile_seconds, times))
        print(f"{name}: {flops / 1e9:.1f} GFLOP per step (XLA cost analysis)")
    peak_after = common.matmul_peak_flops()
    peak = max(peak_before, peak_after)
    print(f"float32 matmul peak (2048x2048 jnp.dot, best of 10): {peak_before / 1e9:.1f} "
          f"GFLOP/s before the steps, {peak_after / 1e9:.1f} after\n")
    rows = []
    for name, batch_size, flops, compile_seconds, times in measured:
        for impl, seconds in times.items():
            rows.append([
                name, batch_size, impl, common.fmt_ms(seconds),
                f"{batch_size / seconds:.1f}",
                f"{flops / seconds / 1e9:.1f}", f"{flops / seconds / peak:.0%}",
                common.fmt_ratio(seconds / times["vqdiff_jax"]),
                f"{compile_seconds:.1f}" if impl == "vqdiff_jax" else "-",
            ])
    common.print_table(
        ["model", "batch", "implementation", "step ms", "images/s", "GFLOP/s",
         "of matmul peak", "time / vqdiff_jax", "compile s"],
        rows)

if __name__ == "__main__":
    main()
