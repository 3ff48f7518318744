"""Classifier model, train step and the end-to-end classifier experiment."""

import json
import os
import shutil

import chex
import jax
import ml_collections
import numpy as np
import optax
import pytest

from experiments import train_classifier
from experiments.configs import classifier_mnist
from vqdiff_jax import checkpointing, evaluation, metric_writers, parallel
from vqdiff_jax.data import pipeline
from vqdiff_jax.models import classifier as classifier_lib

IMAGE_SHAPE = (8, 8, 1)


def _model(dropout_rate=0.0):
    return classifier_lib.Classifier(
        num_classes=10, conv_features=(4, 8), hidden_dim=16, dropout_rate=dropout_rate)


def _batch(batch_size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, size=(batch_size, *IMAGE_SHAPE)).astype(np.float32),
        "label": rng.integers(0, 10, size=batch_size).astype(np.int32),
    }


def test_classifier_output_shapes():
    model = _model()
    params = classifier_lib.init_params(model, jax.random.key(0), IMAGE_SHAPE)
    logits, features = model.apply({"params": params}, _batch()["image"], train=False)
    assert logits.shape == (16, 10)
    assert features.shape == (16, 16)
    assert np.all(np.asarray(features) >= 0)  # Post-ReLU.


def test_classifier_dropout():
    model = _model(dropout_rate=0.5)
    params = classifier_lib.init_params(model, jax.random.key(0), IMAGE_SHAPE)
    images = _batch()["image"]

    def apply(key):
        return model.apply({"params": params}, images, train=True, rngs={"dropout": key})

    logits_a, features_a = apply(jax.random.key(1))
    logits_b, features_b = apply(jax.random.key(2))
    eval_logits, eval_features = model.apply({"params": params}, images, train=False)
    assert not np.allclose(logits_a, logits_b)
    # Features are taken before dropout, so they do not depend on the dropout key.
    np.testing.assert_allclose(features_a, features_b)
    np.testing.assert_allclose(features_a, eval_features)
    assert eval_logits.shape == logits_a.shape


def test_make_classifier_rejects_bad_config():
    good = dict(conv_features=(4,), hidden_dim=8, dropout_rate=0.0)
    for field, value in [("conv_features", ()), ("hidden_dim", 0), ("dropout_rate", 1.0)]:
        config = ml_collections.ConfigDict({**good, field: value})
        with pytest.raises(ValueError, match=f"model.{field}"):
            classifier_lib.make_classifier(config, num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        classifier_lib.make_classifier(ml_collections.ConfigDict(good), num_classes=1)


def test_image_too_small_raises():
    with pytest.raises(ValueError, match="at least 4x4"):
        classifier_lib.init_params(_model(), jax.random.key(0), (3, 3, 1))


def test_train_step_bias_gradient():
    # With SGD and no dropout, the output-layer bias moves by -lr times the
    # cross-entropy gradient, which is mean(softmax(logits) - onehot(label)).
    model, lr = _model(), 0.1
    tx = optax.sgd(lr)
    state = classifier_lib.init_state(model, tx, jax.random.key(0), IMAGE_SHAPE)
    batch = _batch()
    logits, _ = model.apply({"params": state.params}, batch["image"], train=False)
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected_grad = np.mean(probs - np.eye(10)[batch["label"]], axis=0)

    step = train_classifier.make_train_step(model, tx, lambda _: lr, seed=0)
    new_state, metrics = jax.jit(step)(state, batch)
    bias_change = np.asarray(new_state.params["logits"]["bias"] - state.params["logits"]["bias"])
    np.testing.assert_allclose(bias_change, -lr * expected_grad, rtol=1e-4, atol=1e-7)
    assert int(new_state.step) == 1
    expected_loss = -np.mean(np.log(probs[np.arange(16), batch["label"]]))
    np.testing.assert_allclose(metrics["train/loss"], expected_loss, rtol=1e-5)
    assert float(metrics["train/grad_norm"]) > 0


def _run_steps(num_devices, num_steps=2):
    """Run the jitted train step on a `data` mesh of `num_devices` and return the params."""
    mesh = parallel.make_mesh(num_devices)
    model = _model(dropout_rate=0.5)
    tx = optax.adam(1e-2)
    state = classifier_lib.init_state(model, tx, jax.random.key(0), IMAGE_SHAPE)
    sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    state = jax.device_put(state, sharding)
    step_fn = chex.assert_max_traces(
        train_classifier.make_train_step(model, tx, lambda _: 1e-2, seed=3), n=1)
    train_step = jax.jit(
        step_fn,
        in_shardings=(sharding, parallel.batch_sharded(mesh)),
        out_shardings=(sharding, parallel.replicated(mesh)),
        donate_argnums=0)
    for i in range(num_steps):
        batch = jax.device_put(_batch(seed=i), parallel.batch_sharded(mesh))
        state, _ = train_step(state, batch)
    chex.clear_trace_counter()
    return jax.device_get(state.params)


def test_train_step_devices_agree():
    # Dropout masks are drawn for the global batch, so 1 and 8 devices agree.
    one = _run_steps(1)
    eight = _run_steps(8)
    chex.assert_trees_all_close(one, eight, rtol=1e-4, atol=1e-5)


# End-to-end runs of the experiment with the tiny config. One run is trained
# once per module, and tests that change it work on a copy of its work directory.


def _tiny_config(data_dir):
    config = classifier_mnist.get_config("tiny")
    config.data.data_dir = data_dir
    return config


def _count_train_lines(workdir):
    return sum("train/loss" in row for row in metric_writers.read_metrics(workdir))


def _checkpoint_steps(workdir):
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), fingerprint={})
    steps = checkpointer.all_steps()
    checkpointer.close()
    return sorted(steps)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir, metrics) of one finished tiny run."""
    root = tmp_path_factory.mktemp("classifier")
    config = _tiny_config(str(root / "tfds"))
    workdir = str(root / "run")
    metrics = train_classifier.train_and_evaluate(config, workdir)
    return config, workdir, metrics


def _copy_run(trained, tmp_path):
    config, workdir, metrics = trained
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return ml_collections.ConfigDict(config.to_dict()), copy, metrics


def test_experiment_writes_eval_metrics(trained):
    config, workdir, metrics = trained
    with open(os.path.join(workdir, "eval_metrics.json")) as f:
        written = json.load(f)
    assert written["step"] == config.num_train_steps
    assert written["num_images"] == 500
    assert 0.0 <= written["accuracy"] <= 1.0
    assert written["accuracy"] == pytest.approx(metrics["accuracy"])
    assert np.isfinite(written["loss"])
    assert _count_train_lines(workdir) == config.num_train_steps
    assert _checkpoint_steps(workdir)[-1] == config.num_train_steps


def test_experiment_resume_no_retraining(trained, tmp_path):
    config, workdir, metrics = _copy_run(trained, tmp_path)
    steps = _checkpoint_steps(workdir)
    resumed = train_classifier.train_and_evaluate(config, workdir)
    assert resumed["step"] == config.num_train_steps
    assert resumed["accuracy"] == pytest.approx(metrics["accuracy"])
    assert resumed["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    assert _count_train_lines(workdir) == config.num_train_steps
    assert _checkpoint_steps(workdir) == steps


def test_experiment_extends_training(trained, tmp_path):
    # Raising num_train_steps on a finished run continues from its checkpoint.
    config, workdir, _ = _copy_run(trained, tmp_path)
    config.num_train_steps += 1
    metrics = train_classifier.train_and_evaluate(config, workdir)
    assert metrics["step"] == config.num_train_steps
    assert _count_train_lines(workdir) == config.num_train_steps


def test_load_classifier_matches_eval(trained):
    config, workdir, metrics = trained
    model, params = evaluation.load_classifier(workdir)
    assert model.hidden_dim == config.model.hidden_dim
    eval_images, eval_labels = pipeline.load_split_as_arrays(
        config.data.dataset, config.data.eval_split, config.data.data_dir)
    _, logits = evaluation.classifier_features_and_logits(
        model, params, eval_images, batch_size=100)
    assert evaluation.accuracy(logits, eval_labels) == pytest.approx(metrics["accuracy"])


def test_load_classifier_rejects_changed_config(trained, tmp_path):
    _, workdir, _ = _copy_run(trained, tmp_path)
    config_path = os.path.join(workdir, "config.json")
    with open(config_path) as f:
        stored = json.load(f)
    stored["model"]["hidden_dim"] += 1
    with open(config_path, "w") as f:
        json.dump(stored, f)
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="hidden_dim"):
        evaluation.load_classifier(workdir)
