"""Benchmark DDIM sampling with classifier-free guidance on the default MNIST DiT.

vqdiff_jax runs `latent_diffusion.sample_latents` (50 DDIM steps compiled as one
`lax.scan`, guidance scale 4, the conditional and unconditional halves in one doubled
batch). PyTorch runs `torch_reference.ddim_sample`, the same sampler as a Python
loop in inference mode. The model is the untrained DiT of
experiments/configs/dit_mnist.py on 7x7x8 latents; its weights do not change the
cost. Compile time is reported apart from the sampling time.

Run from the repository root:
  .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import time

import common  # Sets OMP_WAIT_POLICY before torch is imported.
import jax
import jax.numpy as jnp
import torch
import torch_reference

from experiments.configs import dit_mnist
from vqdiff_jax import latent_diffusion

LATENT_SHAPE = (7, 7, 8)
NUM_CLASSES = 10


def build_jax(config, batch_size: int):
    """Return (sampler call that blocks, compile seconds)."""
    model = latent_diffusion.make_dit(config.model, NUM_CLASSES)
    schedule = latent_diffusion.make_schedule(config.diffusion)
    x = jnp.zeros((1, *LATENT_SHAPE), jnp.float32)
    zeros = jnp.zeros((1,), jnp.int32)
    params = model.init(jax.random.key(0), x, zeros, zeros, train=False)["params"]
    labels = jnp.arange(batch_size, dtype=jnp.int32) % NUM_CLASSES
    key = jax.random.key(config.sample.seed)
    sample = config.sample
    static = {"model": model, "num_steps": sample.num_steps, "sampler": sample.sampler,
              "spacing": sample.spacing, "prediction_type": config.diffusion.prediction_type,
              "latent_shape": LATENT_SHAPE}
    dynamic = {"params": params, "schedule": schedule, "labels": labels, "key": key,
               "guidance_scale": sample.guidance_scale, "eta": sample.eta}
    start = time.perf_counter()
    compiled = latent_diffusion.sample_latents.lower(**static, **dynamic).compile()
    compile_seconds = time.perf_counter() - start
    return lambda: jax.block_until_ready(compiled(**dynamic)), compile_seconds


def build_torch(config, batch_size: int):
    torch.manual_seed(0)
    m = config.model
    model = torch_reference.DiT(
        input_size=LATENT_SHAPE, patch_size=m.patch_size, hidden_size=m.hidden_size,
        depth=m.depth, num_heads=m.num_heads, num_classes=NUM_CLASSES,
        mlp_ratio=m.mlp_ratio).eval()
    labels = torch.arange(batch_size) % NUM_CLASSES
    generator = torch.Generator().manual_seed(config.sample.seed)
    return lambda: torch_reference.ddim_sample(
        model, labels, num_steps=config.sample.num_steps,
        guidance_scale=config.sample.guidance_scale, num_classes=NUM_CLASSES,
        generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=50, help="images per sampler call")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per implementation")
    args = parser.parse_args()

    config = dit_mnist.get_config()
    common.print_header(
        f"DDIM sampling, {config.sample.num_steps} steps, guidance scale "
        f"{config.sample.guidance_scale}, MNIST DiT on {LATENT_SHAPE} latents")
    jax_sample, compile_seconds = build_jax(config, args.batch_size)
    calls = {"vqdiff_jax (lax.scan)": jax_sample,
             "PyTorch eager (Python loop)": build_torch(config, args.batch_size)}
    times = common.time_interleaved(calls, rounds=args.rounds, warmup=1)
    jax_time = times["vqdiff_jax (lax.scan)"]
    rows = [
        [impl, args.batch_size, f"{seconds:.2f}", f"{args.batch_size / seconds:.1f}",
         common.fmt_ratio(seconds / jax_time),
         f"{compile_seconds:.1f}" if impl.startswith("vqdiff_jax") else "-"]
        for impl, seconds in times.items()
    ]
    common.print_table(
        ["implementation", "images", "seconds", "images/s", "time / vqdiff_jax", "compile s"],
        rows)


if __name__ == "__main__":
    main()
