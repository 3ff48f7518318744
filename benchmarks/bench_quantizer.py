"""Benchmark the quantizer: nearest-code search, lookup and EMA update.

Compares `vqdiff_jax.quantizer` with `torch.cdist` + `argmin` (plus the same EMA
update written with `index_add_`) and with `vector_quantize_pytorch.VectorQuantize`
(EMA codebook, k-means initialisation off), for N = 16384 vectors of D = 64 and
K in {512, 8192} codes. Times are medians of calls alternated between the
implementations. Peak memory is measured for each implementation in a fresh process
as the growth of the resident set during one call, after a warm-up call.

Run from the repository root:
  .venv/bin/python benchmarks/bench_quantizer.py [--before]

`--before` adds the search as vqdiff_jax did it before the CPU changes: one
`jnp.argmin` over the whole [N, K] distance matrix.
"""

from __future__ import annotations

import argparse
import sys

import common  # Sets OMP_WAIT_POLICY before torch is imported.
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch_reference

from vqdiff_jax import quantizer

NUM_VECTORS = 16384
DIM = 64
NUM_CODES = (512, 8192)
DECAY = 0.99
EPS = 1e-5
IMPLEMENTATIONS = ("vqdiff_jax", "torch cdist+argmin", "vector-quantize-pytorch")
BEFORE = "jnp.argmin, no chunks (before)"


def _inputs(num_codes: int, num_vectors: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(num_vectors, DIM)).astype(np.float32)
    codebook = rng.normal(size=(num_codes, DIM)).astype(np.float32)
    return z, codebook


def _argmin_search(z, codebook):
    """Search as vqdiff_jax did before the CPU changes: all distances, then `jnp.argmin`."""
    dots = jnp.einsum("nd,kd->nk", z, codebook, precision="highest")
    distances = jnp.sum(codebook * codebook, axis=-1) - 2.0 * dots
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def build(name: str, num_codes: int, num_vectors: int = NUM_VECTORS):
    """Return (search, step, compiled) for one implementation.

    `search()` runs the nearest-code search alone (None where the library has no
    separate entry point), `step()` runs search, lookup and EMA update, and
    `compiled` is the compiled JAX step, or None.
    """
    z_np, codebook_np = _inputs(num_codes, num_vectors)

    if name in ("vqdiff_jax", BEFORE):
        z = jnp.asarray(z_np)
        state = quantizer.VQState(
            codebook=jnp.asarray(codebook_np),
            cluster_size=jnp.ones((num_codes,), jnp.float32),
            embed_sum=jnp.asarray(codebook_np))
        nearest = quantizer.nearest_codes if name == "vqdiff_jax" else _argmin_search

        def step_fn(state, z):
            codes = nearest(z, state.codebook)
            z_q = quantizer.lookup(state.codebook, codes)
            return z_q, quantizer.ema_update(state, z, codes, decay=DECAY, eps=EPS)

        search = jax.jit(nearest).lower(z, state.codebook).compile()
        step = jax.jit(step_fn).lower(state, z).compile()
        return (lambda: jax.block_until_ready(search(z, state.codebook)),
                lambda: jax.block_until_ready(step(state, z)), step)

    torch.manual_seed(0)
    z = torch.from_numpy(z_np)
    if name == "torch cdist+argmin":
        codebook = torch.from_numpy(codebook_np)
        cluster_size = torch.ones(num_codes)
        embed_sum = codebook.clone()

        @torch.no_grad()
        def step():
            codes = torch_reference.nearest_codes_cdist(z, codebook)
            z_q = codebook[codes]
            torch_reference.ema_update(
                cluster_size, embed_sum, z, codes, decay=DECAY, eps=EPS)
            return z_q

        return torch.no_grad()(lambda: torch_reference.nearest_codes_cdist(z, codebook)), step, None

    if name == "vector-quantize-pytorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=DIM, codebook_size=num_codes, decay=DECAY, eps=EPS,
                            kmeans_init=False, commitment_weight=0.25).train()
        batch = z[None]  # [1, N, D]
        return None, torch.no_grad()(lambda: vq(batch)), None

    raise ValueError(f"Unknown implementation {name!r}; expected one of {IMPLEMENTATIONS}.")


def memory_child(name: str, num_codes: int) -> None:
    """Print the peak RSS growth of one step of `name`.

    XLA's CPU runtime keeps the buffers of a finished call mapped, so a second JAX
    call would not grow the RSS: the JAX step is measured on its first call after
    compilation, and the number includes one-time runtime buffers. PyTorch frees
    its buffers back to the system, so a warm-up call on 256 vectors first sets up
    its thread pools and MKL buffers (about 10 MiB).
    """
    if name in ("vqdiff_jax", BEFORE):
        _, step, _ = build(name, num_codes)
    else:
        build(name, num_codes, num_vectors=256)[1]()
        _, step, _ = build(name, num_codes)
    common.report_child_memory(common.peak_rss_delta(step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", action="store_true",
                        help="also time the search as it was before the CPU changes")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per implementation")
    args = parser.parse_args()
    names = IMPLEMENTATIONS + ((BEFORE,) if args.before else ())

    common.print_header(f"Quantizer: N={NUM_VECTORS}, D={DIM}, search + lookup + EMA update")
    rows = []
    for num_codes in NUM_CODES:
        built = {name: build(name, num_codes) for name in names}
        # Warm-up: a full JAX step, and PyTorch on 256 vectors (a full
        # vector-quantize-pytorch call at K=8192 takes about 10 s on 2 cores).
        for name, (_, step, _) in built.items():
            if name in ("vqdiff_jax", BEFORE):
                step()
            else:
                build(name, num_codes, num_vectors=256)[1]()
        calls = {}
        for name, (search, step, _) in built.items():
            calls[("step", name)] = step
            if search is not None:
                calls[("search", name)] = search
        times = common.time_interleaved(calls, rounds=args.rounds, warmup=0)
        step_times = {name: t for (kind, name), t in times.items() if kind == "step"}
        search_times = {name: t for (kind, name), t in times.items() if kind == "search"}
        jax_time = step_times["vqdiff_jax"]
        for name, (_, _, compiled) in built.items():
            peak = common.peak_memory_in_subprocess(__file__, [name, str(num_codes)])
            temp = "-"
            if compiled is not None:
                temp = f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f}"
            rows.append([
                num_codes, name,
                common.fmt_ms(search_times[name]) if name in search_times else "-",
                common.fmt_ms(step_times[name]),
                common.fmt_ratio(step_times[name] / jax_time),
                f"{peak:.1f}", temp,
            ])
        del built
    common.print_table(
        ["K", "implementation", "search ms", "search+lookup+EMA ms", "time / vqdiff_jax",
         "peak RSS growth MiB", "XLA temp MiB"],
        rows)


if __name__ == "__main__":
    child_args = common.memory_child_args()
    if child_args is not None:
        memory_child(child_args[0], int(child_args[1]))
        sys.exit(0)
    main()
