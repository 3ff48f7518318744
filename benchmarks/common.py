"""Timing, memory and reporting helpers shared by the benchmark scripts.

The scripts time vqdiff_jax and a PyTorch reference in the same process, one call of
each in turn, so that load from other processes slows both sides alike. Each result
is the median over the measured rounds.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

# PyTorch's OpenMP threads spin while they wait for work by default. On a machine
# shared with other processes, a spinning thread keeps busy the core that the thread
# it waits for needs. At a load average of 10 on 2 cores, a 2-thread forward pass of
# the MNIST DiT took 2.1 s (median), and 0.13 s with passive waiting.
# Set here, before any script imports torch; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A child process started by `peak_memory_in_subprocess` sets glibc's mmap threshold
# to a fixed 64 KiB. Every larger buffer then gets its own mapping, and freeing it
# returns the pages at once, so the peak RSS of a call is not hidden by memory that
# the allocator kept from an earlier call.
_MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_MEMORY_FLAG = "--memory-child"


def machine_info() -> dict[str, str]:
    """Describe the machine and the library versions for the table headers."""
    import jax
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    preload = os.environ.get("LD_PRELOAD", "")
    return {
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "jax": jax.__version__,
        "jax backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "malloc": "tcmalloc (LD_PRELOAD)" if "tcmalloc" in preload else "glibc (default)",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def print_header(title: str) -> None:
    print(f"\n## {title}\n")
    for key, value in machine_info().items():
        print(f"- {key}: {value}")
    print()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a Markdown table, so the output can be pasted into README.md."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    print(f"\nload average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def time_interleaved(
    functions: dict[object, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
) -> dict[object, float]:
    """Time each zero-argument function `rounds` times, alternating between them.

    Each function must block until its result is ready (call
    `jax.block_until_ready` inside). Returns the median seconds per call.
    """
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """Measure the float32 matmul rate of `jnp.dot` on [size, size] operands, in FLOP/s.

    Returns the rate of the fastest of `repeats` calls, after two warm-up calls. A peak
    is the rate the machine can reach. On a virtual machine whose speed varied, a median
    of 5 calls once read 76 GFLOP/s where 130 GFLOP/s was reached minutes later, and a
    train step then looked faster than the peak.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    for _ in range(2):
        jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled JAX function, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # Older jax versions return one dict per device.
        analysis = analysis[0]
    return float(analysis["flops"])


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status.")


def peak_rss_delta(run: Callable[[], object]) -> float:
    """Run `run` once and return its peak resident memory above the current RSS, in MiB.

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM),
    so the mark afterwards is the peak of this call alone (Linux only).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _read_status_kib("VmRSS")
    run()
    return (_read_status_kib("VmHWM") - baseline) / 1024.0


def peak_memory_in_subprocess(script: str, args: Sequence[str]) -> float:
    """Run `script --memory-child ARGS` in a fresh process; return the MiB it prints.

    The child runs without LD_PRELOAD, because tcmalloc keeps freed pages mapped.
    """
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(_MEMORY_CHILD_ENV)
    result = subprocess.run(
        [sys.executable, script, _MEMORY_FLAG, *args],
        env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"Memory measurement {args} failed with exit code {result.returncode}:\n"
            f"{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def memory_child_args() -> list[str] | None:
    """Return the arguments after --memory-child, or None in the parent process."""
    if len(sys.argv) > 1 and sys.argv[1] == _MEMORY_FLAG:
        return sys.argv[2:]
    return None


def report_child_memory(peak_mib: float) -> None:
    print(json.dumps({"peak_mib": peak_mib}))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"
