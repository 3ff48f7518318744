"""Shared pytest set-up: eight simulated CPU devices for every test.

XLA reads the device count once, when JAX first initialises its CPU backend, so
the flag is set here before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    # Tiny test models compile faster than they run; skip XLA's slow optimisation passes.
    + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow is used only for input pipelines; keep it off any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
