"""Data parallelism over devices and over processes.

* Gradients are averaged over the global batch, not summed over devices.
* The DiT train step draws different timesteps, noise and label drops on every
  device, reproducibly from (seed, step), and the same values on 1 and 8 devices.
* Two processes joined by `jax.distributed` over 127.0.0.1 (2 CPU devices each)
  train the tokenizer to the same state as one process with 4 devices.
"""

import itertools
import socket
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import runs, trees

from experiments.configs import dit_mnist
from vqdiff_jax import diffusion, latent_diffusion, parallel
from vqdiff_jax.data import sharding
from vqdiff_jax.train_state import make_optimizer

LATENT_SHAPE = (7, 7, 4)
NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------
# Gradient averaging.
# ------------------------------------------------------------------------------------------


def test_gradients_averaged_over_devices():
    mesh = parallel.make_mesh(2)
    replicated = parallel.replicated(mesh)
    tx = optax.sgd(0.01)

    def train_step(w, opt_state, batch):
        def loss_fn(w):
            return jnp.mean((w * batch["x"] - batch["y"]) ** 2)

        grad = jax.grad(loss_fn)(w)
        updates, opt_state = tx.update(grad, opt_state, w)
        return optax.apply_updates(w, updates), opt_state

    step = jax.jit(train_step, in_shardings=(replicated, replicated, parallel.batch_sharded(mesh)),
                   out_shardings=(replicated, replicated))
    batch = sharding.make_global_batch(
        {"x": np.array([1.0, 2.0, 3.0, 4.0], np.float32),
         "y": np.array([2.0, 4.0, 6.0, 8.0], np.float32)}, mesh)
    w = jax.device_put(jnp.zeros((), jnp.float32), replicated)

    w, _ = step(w, tx.init(w), batch)

    shards_x = [np.asarray(shard.data).tolist() for shard in batch["x"].addressable_shards]
    assert shards_x == [[1.0, 2.0], [3.0, 4.0]]
    # d/dw mean((w x - y)^2) at w = 0 is -2 mean(x y) = -30, so w = 0 + 0.01 * 30.
    # Summing the two per-device means (-10 and -50) would give w = 0.6.
    for shard in w.addressable_shards:
        np.testing.assert_allclose(np.asarray(shard.data), 0.3, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Randomness of the DiT train step.
# ------------------------------------------------------------------------------------------


def _make_draws_fn(mesh, seed):
    """Jit a function returning the DiT train step's draws: (t, eps, label-drop mask).

    The draws are captured while the real train step is traced: `t` and `eps`
    from its call of `diffusion.q_sample`, the mask from the labels that
    `LabelEmbedder.drop_labels` returns (dropped labels become the null label).
    All three are [batch, ...] arrays sharded over the `data` mesh axis.
    """
    config = dit_mnist.get_config("tiny")
    config.model.class_dropout_prob = 0.5  # Masks with many drops tell devices apart.
    model = latent_diffusion.make_dit(config.model, NUM_CLASSES)
    schedule = latent_diffusion.make_schedule(config.diffusion)
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    train_step = latent_diffusion.make_train_step(
        model, schedule, config.diffusion, tx, seed=seed, ema_decay=config.ema_decay)
    q_sample = diffusion.q_sample

    def draws(state, batch):
        captured = {}

        def q_sample_spy(schedule, x_0, t, eps):
            captured["t"], captured["eps"] = t, eps
            return q_sample(schedule, x_0, t, eps)

        def record_labels(next_fun, args, kwargs, context):
            labels = next_fun(*args, **kwargs)
            if context.method_name == "drop_labels":
                captured["dropped"] = labels == context.module.null_label
            return labels

        with mock.patch.object(diffusion, "q_sample", q_sample_spy), \
                nn.intercept_methods(record_labels):
            train_step(state, batch)
        return captured["t"], captured["eps"], captured["dropped"]

    init_state = jax.jit(
        lambda: latent_diffusion.init_state(model, tx, jax.random.key(0), LATENT_SHAPE),
        out_shardings=parallel.replicated(mesh))
    draws_fn = jax.jit(draws, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                       out_shardings=parallel.batch_sharded(mesh))
    return draws_fn, init_state()


def _batch(mesh, batch_size=64):
    rng = np.random.default_rng(0)
    return sharding.make_global_batch({
        "latent": rng.normal(size=(batch_size, *LATENT_SHAPE)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32),
    }, mesh)


def _shards(array):
    return [np.asarray(shard.data) for shard in array.addressable_shards]


@pytest.fixture(scope="module")
def draws_8_devices():
    """(draws function, state, batch) on an 8-device mesh, seed 0."""
    mesh = parallel.make_mesh(8)
    draws_fn, state = _make_draws_fn(mesh, seed=0)
    return draws_fn, state, _batch(mesh)


def test_draws_differ_across_devices(draws_8_devices):
    draws_fn, state, batch = draws_8_devices
    t, eps, dropped = draws_fn(state, batch)

    t_shards, eps_shards, dropped_shards = _shards(t), _shards(eps), _shards(dropped)
    assert len(t_shards) == 8
    assert t_shards[0].shape == (8,)
    for a, b in itertools.combinations(range(8), 2):
        assert not np.array_equal(t_shards[a], t_shards[b]), (a, b)
        assert not np.array_equal(eps_shards[a], eps_shards[b]), (a, b)
    assert len({shard.tobytes() for shard in dropped_shards}) > 1
    assert 0 < np.asarray(dropped).mean() < 1


def test_draws_reproduce_per_step(draws_8_devices):
    draws_fn, state, batch = draws_8_devices
    first = [np.asarray(x) for x in draws_fn(state, batch)]
    again = [np.asarray(x) for x in draws_fn(state, batch)]
    next_step = [np.asarray(x) for x in draws_fn(state.replace(step=state.step + 1), batch)]
    rebuilt_fn, _ = _make_draws_fn(parallel.make_mesh(8), seed=0)
    rebuilt = [np.asarray(x) for x in rebuilt_fn(state, batch)]
    other_seed_fn, _ = _make_draws_fn(parallel.make_mesh(8), seed=1)
    other_seed = [np.asarray(x) for x in other_seed_fn(state, batch)]

    for name, a, b, c in zip(("t", "eps", "dropped"), first, again, rebuilt):
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(a, c, err_msg=name)
    t, eps, _ = first
    t_next, eps_next, dropped_next = next_step
    # Every device draws new values at the next step.
    assert not np.any(np.all(t.reshape(8, -1) == t_next.reshape(8, -1), axis=1))
    assert not np.any(np.all(eps.reshape(8, -1) == eps_next.reshape(8, -1), axis=1))
    assert not np.array_equal(first[2], dropped_next)
    assert not np.array_equal(t, other_seed[0])


def test_draws_same_on_1_and_8_devices(draws_8_devices):
    draws_fn, state, batch = draws_8_devices
    one_device = parallel.make_mesh(1)
    draws_fn_1, state_1 = _make_draws_fn(one_device, seed=0)
    batch_1 = _batch(one_device)

    for name, a, b in zip(("t", "eps", "dropped"), draws_fn(state, batch),
                          draws_fn_1(state_1, batch_1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# ------------------------------------------------------------------------------------------
# Two processes.
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_all(procs, log_paths, timeout=runs.TIMEOUT_S):
    """Wait for every process; kill the others as soon as one fails."""
    deadline = time.monotonic() + timeout
    try:
        while any(proc.poll() is None for proc in procs):
            failed = [i for i, proc in enumerate(procs) if proc.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log_path in zip(procs, log_paths):
        assert proc.returncode == 0, (
            f"process exited with status {proc.returncode}. End of its output:\n"
            f"{log_path.read_text()[-4000:]}")


@pytest.mark.slow
def test_two_processes_match_single(tmp_path, tmp_path_factory):
    data_dir = runs.data_dir(tmp_path_factory)
    workdir = tmp_path / "run"
    state_path = tmp_path / "final_state"
    port = _free_port()
    env = runs.trainer_env(tmp_path_factory, num_devices=2)

    procs, log_paths = [], []
    for process_id in range(2):
        flags = runs.tokenizer_flags(
            workdir, data_dir, "--config.checkpoint_every=4",
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process_id}")
        cmd = runs.command(runs.TOKENIZER, flags, (f"--final_state={state_path}",))
        log_paths.append(tmp_path / f"process{process_id}.log")
        procs.append(runs.start(cmd, env, log_paths[-1]))
    _wait_all(procs, log_paths)

    for process_id, log_path in enumerate(log_paths):
        assert f"process {process_id} of 2, 4 global device(s)" in log_path.read_text()
    with np.load(f"{state_path}.process0.npz") as f:
        state_0 = dict(f)
    with np.load(f"{state_path}.process1.npz") as f:
        state_1 = dict(f)
    assert trees.bitwise_differences(state_0, state_1) == []

    # Orbax saves wait for every process at barriers. The saved state is the one in memory.
    assert runs.checkpoint_steps(workdir) == [4, runs.NUM_STEPS]
    saved = runs.load_state(workdir, runs.NUM_STEPS)
    assert trees.bitwise_differences(saved, state_0) == []
    # Only process 0 writes metrics, so every step has one line.
    assert runs.train_metric_steps(workdir) == list(range(1, runs.NUM_STEPS + 1))

    # Same global batches as one process with 4 devices: equal up to the order of float sums.
    # The reference is built here, not first, so that it can overlap with the run above.
    reference = runs.tokenizer_reference(tmp_path_factory)
    expected = runs.load_state(reference, runs.NUM_STEPS)
    assert saved.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(saved[name], expected[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
