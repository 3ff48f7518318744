"""Benchmark single 3x3 convolutions, forward and backward, XLA against PyTorch.

The tokenizer train step spends most of its time in convolutions, so this script
isolates them: one 3x3 'SAME' convolution without bias at the shapes of the
tokenizer configurations, differentiated with respect to input and kernel through
`sum(conv(x, w) ** 2)`. XLA runs `lax.conv_general_dilated` in NHWC. PyTorch runs
`nn.Conv2d` with NCHW and with channels-last tensors.

Run from the repository root:
  .venv/bin/python benchmarks/bench_conv.py
"""

from __future__ import annotations

import argparse

import common  # Sets OMP_WAIT_POLICY before torch is imported.
import jax
import jax.numpy as jnp
import torch

# (batch, height, width, in channels, out channels): the widest convolutions of the
# MNIST tokenizer at 28x28 and 14x14, and of the f8 tokenizer at 64x64.
SHAPES = (
    (64, 28, 28, 32, 32),
    (64, 28, 28, 64, 64),
    (64, 14, 14, 64, 256),
    (32, 64, 64, 32, 32),
)


def build_jax(batch, height, width, channels, out_channels):
    x = jax.random.normal(jax.random.key(0), (batch, height, width, channels))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, channels, out_channels))

    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(x, w))


def build_torch(batch, height, width, channels, out_channels, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=memory_format)
    x.requires_grad_()
    conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
    conv = conv.to(memory_format=memory_format)

    def step():
        (conv(x) ** 2).sum().backward()
        x.grad = None
        conv.weight.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per implementation")
    args = parser.parse_args()

    common.print_header("3x3 convolution, forward and backward (input and kernel gradients)")
    rows = []
    for shape in SHAPES:
        calls = {
            "XLA, NHWC": build_jax(*shape),
            "PyTorch, NCHW": build_torch(*shape, channels_last=False),
            "PyTorch, channels_last": build_torch(*shape, channels_last=True),
        }
        times = common.time_interleaved(calls, rounds=args.rounds, warmup=1)
        batch, height, width, channels, out_channels = shape
        # Forward, input gradient and kernel gradient cost the same multiply-adds.
        flops = 3 * 2 * batch * height * width * channels * out_channels * 9
        for impl, seconds in times.items():
            rows.append([
                f"{batch}x{height}x{width}, {channels}->{out_channels}", impl,
                common.fmt_ms(seconds), f"{flops / seconds / 1e9:.0f}",
                common.fmt_ratio(seconds / times["XLA, NHWC"]),
            ])
    common.print_table(
        ["input, channels", "implementation", "ms", "GFLOP/s", "time / XLA"], rows)


if __name__ == "__main__":
    main()
