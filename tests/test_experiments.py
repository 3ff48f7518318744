"""End-to-end runs of the tokenizer and DiT experiments and of DiT sampling, on tiny configs.

One tokenizer run and one DiT run on top of it are trained per test session. A file
lock shares them between pytest-xdist workers, so each is trained once, and tests
that change a run work on a copy of its work directory.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import sample_dit, train_dit, train_tokenizer
from experiments.configs import dit_mnist, tokenizer_mnist
from vqdiff_jax import checkpointing, latent_diffusion, metric_writers, tokenizer
from vqdiff_jax.data import pipeline

NUM_CLASSES = 10

# With `pytest --dist loadgroup`, every test here runs in one worker. Under other modes
# the file lock in `_run_once` still trains each shared run once.
pytestmark = pytest.mark.xdist_group("experiment_runs")


# ---------------------------------------------------------------------------
# Shared runs.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_once(root: pathlib.Path, name: str, run) -> str:
    """Run `run(directory)` in the first worker that needs it and return the directory.

    Later callers, in any worker, wait for the lock and reuse the finished directory.
    """
    directory = root / name
    with _file_lock(root / f"{name}.lock"):
        if not (root / f"{name}.complete").exists():
            shutil.rmtree(directory, ignore_errors=True)
            run(str(directory))
            (root / f"{name}.complete").touch()
    return str(directory)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory):
    """A directory shared by every xdist worker of this session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # The workers' base directories share this parent.
    root = root / "experiment_runs"
    root.mkdir(exist_ok=True)
    return root


def _tokenizer_config(root):
    config = tokenizer_mnist.get_config("tiny")
    config.data.data_dir = str(root / "tfds")
    config.num_train_steps = 1
    return config


def _dit_config(tokenizer_workdir):
    config = dit_mnist.get_config("tiny")
    config.tokenizer_workdir = tokenizer_workdir
    config.num_train_steps = 1
    return config


@pytest.fixture(scope="session")
def tokenizer_workdir(shared_root):
    """Work directory of a finished one-step tokenizer run (`_tokenizer_config`)."""
    config = _tokenizer_config(shared_root)
    return _run_once(shared_root, "tokenizer",
                     lambda workdir: train_tokenizer.train_and_evaluate(config, workdir))


@pytest.fixture(scope="session")
def dit_workdir(shared_root, tokenizer_workdir):
    """Work directory of a finished one-step DiT run on the tokenizer run."""
    config = _dit_config(tokenizer_workdir)
    return _run_once(shared_root, "dit",
                     lambda workdir: train_dit.train_and_evaluate(config, workdir))


def _copy_run(workdir, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _checkpoint_steps(workdir):
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), fingerprint={})
    steps = sorted(checkpointer.all_steps())
    checkpointer.close()
    return steps


def _has_checkpoint(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and bool(os.listdir(directory))


def _count_train_lines(workdir):
    return sum("train/loss" in row for row in metric_writers.read_metrics(workdir))


def _perplexity(counts):
    probs = np.asarray(counts, np.float64) / np.sum(counts)
    probs = probs[probs > 0]
    return float(np.exp(-np.sum(probs * np.log(probs))))


# ---------------------------------------------------------------------------
# Tokenizer experiment.
# ---------------------------------------------------------------------------


def test_tokenizer_eval_metrics(shared_root, tokenizer_workdir):
    config = _tokenizer_config(shared_root)
    metrics = _read_json(os.path.join(tokenizer_workdir, "eval_metrics.json"))

    assert metrics["step"] == 1
    assert metrics["num_images"] == config.num_eval_images
    assert np.isfinite(metrics["psnr"])
    assert metrics["psnr"] > 0
    assert sum(metrics["code_counts"]) == config.num_eval_images * 7 * 7
    counts = np.asarray(metrics["code_counts"])
    assert metrics["codes_used_fraction"] == pytest.approx(np.mean(counts > 0))
    assert metrics["perplexity"] == pytest.approx(_perplexity(counts), rel=1e-5)
    assert 1.0 <= metrics["perplexity"] <= config.vq.num_codes


def test_tokenizer_writes_files(tokenizer_workdir):
    files = os.listdir(tokenizer_workdir)
    with Image.open(os.path.join(tokenizer_workdir, "reconstructions.png")) as image:
        # 16 held-out images and their reconstructions: 4 rows of 8 tiles of 28 + 2
        # pixels of padding, plus 2, all scaled by 2.
        assert image.size == (2 * (8 * 30 + 2), 2 * (4 * 30 + 2))
    assert "recon_000001.png" in files
    assert "config.json" in files
    assert _count_train_lines(tokenizer_workdir) == 1
    assert any(name.startswith("events.out.tfevents")
               for name in os.listdir(os.path.join(tokenizer_workdir, "tensorboard")))
    assert _checkpoint_steps(tokenizer_workdir) == [1]


def test_tokenizer_resume_no_retraining(shared_root, tokenizer_workdir, tmp_path):
    workdir = _copy_run(tokenizer_workdir, tmp_path)
    before = _read_json(os.path.join(workdir, "eval_metrics.json"))
    config = _tokenizer_config(shared_root)
    metrics = train_tokenizer.train_and_evaluate(config, workdir)

    assert metrics["step"] == 1
    assert metrics["code_counts"] == before["code_counts"]
    assert metrics["psnr"] == pytest.approx(before["psnr"], rel=1e-6)
    assert _count_train_lines(workdir) == 1
    assert _checkpoint_steps(workdir) == [1]


def test_load_tokenizer_restores(tokenizer_workdir):
    model, state, config = train_tokenizer.load_tokenizer(tokenizer_workdir)
    expected = _read_json(os.path.join(tokenizer_workdir, "eval_metrics.json"))
    images, _ = pipeline.load_split_as_arrays(
        config.data.dataset, config.data.eval_split, config.data.data_dir)
    metrics, _ = tokenizer.evaluate(model, state, images[:config.num_eval_images],
                                    batch_size=config.eval_batch_size,
                                    num_codes=config.vq.num_codes)

    assert int(state.step) == 1
    assert model.latent_dim == config.model.latent_dim == 4
    assert metrics["code_counts"] == expected["code_counts"]
    assert metrics["psnr"] == pytest.approx(expected["psnr"], rel=1e-5)


def test_tokenizer_incompatible_checkpoint(shared_root, tokenizer_workdir, tmp_path):
    workdir = _copy_run(tokenizer_workdir, tmp_path)
    config = _tokenizer_config(shared_root)
    config.model.latent_dim = 5
    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match=r"model\.latent_dim: checkpoint has 4, config has 5"):
        train_tokenizer.train_and_evaluate(config, workdir)
    assert _checkpoint_steps(workdir) == [1]


@pytest.mark.parametrize("field, value, message", [
    ("data.image_size", 30, r"Image size 30x30 is not divisible by the downsampling factor 4"),
    ("model.latent_dim", 0, r"latent_dim must be >= 1, got 0"),
    ("vq.num_codes", 0, r"vq.num_codes \(the codebook size\) must be >= 1, got 0"),
])
def test_tokenizer_bad_config(shared_root, tokenizer_workdir, tmp_path, field, value, message):
    # The error comes before any checkpoint is written.
    config = _tokenizer_config(shared_root)
    block, name = field.split(".")
    config[block][name] = value
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train_tokenizer.train_and_evaluate(config, workdir)
    assert not _has_checkpoint(workdir)


# ---------------------------------------------------------------------------
# DiT experiment.
# ---------------------------------------------------------------------------


def _numpy_stats(latents):
    flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    return flat.mean(0), flat.std(0)


def test_dit_run_outputs(dit_workdir):
    with np.load(os.path.join(dit_workdir, "latents.npz")) as cached:
        latents, labels = cached["latents"], cached["labels"]
    assert latents.shape == (4500, 7, 7, 4)
    assert labels.shape == (4500,)
    assert labels.min() >= 0
    assert labels.max() < NUM_CLASSES
    assert "samples_000001.png" in os.listdir(dit_workdir)
    assert _count_train_lines(dit_workdir) == 1
    assert _checkpoint_steps(dit_workdir) == [1]


def test_dit_latent_stats_in_checkpoint(dit_workdir, tokenizer_workdir):
    with np.load(os.path.join(dit_workdir, "latents.npz")) as cached:
        mean, std = _numpy_stats(cached["latents"])
    checkpointer = checkpointing.Checkpointer(
        os.path.join(dit_workdir, "checkpoints"), fingerprint={})
    meta = checkpointer.read_meta()
    checkpointer.close()

    np.testing.assert_allclose(meta["latent_stats"]["mean"], mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(meta["latent_stats"]["std"], std, rtol=1e-6)
    assert meta["tokenizer_workdir"] == os.path.abspath(tokenizer_workdir)


@pytest.fixture(scope="module")
def loaded_dit(dit_workdir):
    return train_dit.load_dit(dit_workdir)


def test_load_dit_stats(loaded_dit, dit_workdir):
    with np.load(os.path.join(dit_workdir, "latents.npz")) as cached:
        mean, std = _numpy_stats(cached["latents"])
    np.testing.assert_allclose(loaded_dit["stats"]["mean"], mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loaded_dit["stats"]["std"], std, rtol=1e-6)
    assert loaded_dit["latent_shape"] == (7, 7, 4)
    assert loaded_dit["num_classes"] == NUM_CLASSES
    assert int(loaded_dit["state"].step) == 1


def test_dit_missing_tokenizer(tmp_path):
    config = _dit_config(str(tmp_path / "no_tokenizer"))
    with pytest.raises(FileNotFoundError, match=r"python -m experiments\.train_tokenizer"):
        train_dit.train_and_evaluate(config, str(tmp_path / "dit"))


def test_dit_tokenizer_without_checkpoint(tokenizer_workdir, tmp_path):
    # A tokenizer work directory with its config but an empty checkpoint folder.
    empty = tmp_path / "tokenizer"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(tokenizer_workdir, "config.json"), empty / "config.json")
    config = _dit_config(str(empty))
    with pytest.raises(FileNotFoundError, match=r"python -m experiments\.train_tokenizer"):
        train_dit.train_and_evaluate(config, str(tmp_path / "dit"))


def test_dit_tokenizer_workdir_unset(tmp_path):
    config = _dit_config(None)
    with pytest.raises(ValueError, match=r"--config\.tokenizer_workdir=DIR"):
        train_dit.train_and_evaluate(config, str(tmp_path / "dit"))


def test_dit_patch_size_not_dividing(tokenizer_workdir, dit_workdir, tmp_path):
    config = _dit_config(tokenizer_workdir)
    config.model.patch_size = 2
    config.latents_path = os.path.join(dit_workdir, "latents.npz")  # Skips encoding.
    workdir = str(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"height 7 and width 7 must both be divisible by "
                                         r"patch_size 2"):
        train_dit.train_and_evaluate(config, workdir)
    assert not _has_checkpoint(workdir)


# ---------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------


def _sample(dit_workdir, output_dir, **overrides):
    result = sample_dit.sample_to_dir(dit_workdir, str(output_dir),
                                      overrides={"per_class": 1, **overrides})
    with np.load(result["npz"]) as samples:
        return result, samples["images"], samples["labels"]


@pytest.fixture(scope="module")
def first_samples(dit_workdir, tmp_path_factory):
    """(result, images, labels) of sample_to_dir with one image per class and seed 1."""
    return _sample(dit_workdir, tmp_path_factory.mktemp("samples"), seed=1)


def test_sample_to_dir_outputs(first_samples):
    result, images, labels = first_samples
    assert images.dtype == np.uint8
    assert images.shape == (NUM_CLASSES, 28, 28, 1)
    np.testing.assert_array_equal(labels, np.arange(NUM_CLASSES))
    assert result["num_images"] == NUM_CLASSES
    assert os.path.exists(result["png"])
    assert images.min() < images.max()


def test_sampling_deterministic(first_samples, dit_workdir, tmp_path):
    _, first, _ = first_samples
    _, again, _ = _sample(dit_workdir, tmp_path / "again", seed=1)
    _, other_seed, _ = _sample(dit_workdir, tmp_path / "other", seed=2)
    np.testing.assert_array_equal(again, first)
    assert not np.array_equal(other_seed, first)


def _generate(run, labels, **sample_overrides):
    sample_config = run["config"].sample.copy_and_resolve_references()
    sample_config.update(sample_overrides)
    tok_model, tok_state, _ = run["tokenizer"]
    return train_dit.generate(
        run["model"], run["state"].ema_params, run["schedule"], run["stats"], tok_model,
        tok_state, np.asarray(labels), sample_config,
        prediction_type=run["config"].diffusion.prediction_type,
        latent_shape=run["latent_shape"], key=jax.random.key(0),
        num_timesteps=run["config"].diffusion.num_timesteps)


@pytest.mark.parametrize("labels, message", [
    ([0, NUM_CLASSES], r"labels must lie in \[0, 9\] \(num_classes=10\), got min 0 and max 10"),
    ([-1, 3], r"labels must lie in \[0, 9\] \(num_classes=10\), got min -1 and max 3"),
])
def test_sample_label_out_of_range(loaded_dit, labels, message):
    with pytest.raises(ValueError, match=message):
        _generate(loaded_dit, labels)


@pytest.mark.parametrize("overrides, message", [
    ({"guidance_scale": -0.5}, r"guidance_scale must be in \[0, 100\]"),
    ({"num_steps": 0}, r"sampling steps must be in \[1, 1000\]"),
    ({"num_steps": 1001}, r"sampling steps must be in \[1, 1000\]"),
])
def test_sample_args_out_of_range(loaded_dit, overrides, message):
    with pytest.raises(ValueError, match=message):
        _generate(loaded_dit, [0, 1], **overrides)


def test_latents_decode_with_stored_stats(loaded_dit):
    # Normalising the z_q of real codes with the stored statistics and decoding through
    # the sampling path gives the tokenizer's own decoding of those codes.
    tok_model, tok_state, _ = loaded_dit["tokenizer"]
    codebook = np.asarray(tokenizer.current_codebook(tok_state))
    codes = np.random.default_rng(0).integers(0, len(codebook), size=(2, 7, 7))
    z_q = codebook[codes]
    normalized = latent_diffusion.normalize(z_q, loaded_dit["stats"])

    images = train_dit.decode_samples(tok_model, tok_state, normalized, loaded_dit["stats"])
    expected = tokenizer.decode_vectors(tok_model, tok_state.params, z_q)
    np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)
