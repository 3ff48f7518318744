"""Sample-quality metrics: Frechet distance and classifier accuracy.

The Frechet distance between two sets of feature vectors is the Frechet
(2-Wasserstein) distance between Gaussians fitted to them:

  d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

It is computed in float64 with numpy and scipy, and accepts features from any
extractor. With the penultimate activations of an Inception network it is
the FID. Here the default extractor is the small MNIST classifier in
`vqdiff_jax.models.classifier`, so the numbers are comparable only with other
numbers computed with the same classifier checkpoint, never with published FIDs.

Class-conditional samples are also scored by the share that the classifier
assigns to the class they were generated for.
"""

import functools
import json
import os
import warnings

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg
from absl import logging

from vqdiff_jax import checkpointing, parallel
from vqdiff_jax.models import classifier as classifier_lib
from vqdiff_jax.train_state import make_optimizer

# The command that writes the checkpoint `load_classifier` reads.
TRAIN_CLASSIFIER_COMMAND = (
    "python -m experiments.train_classifier "
    "--config=experiments/configs/classifier_mnist.py --workdir={workdir}")


# Frechet distance.


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D].

    The covariance uses the unbiased (N - 1) normalisation. With N <= D it is
    singular, which `frechet_distance` may reject.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(
            f"Features must have shape [num_examples, feature_dim], got shape {features.shape}.")
    num_examples, feature_dim = features.shape
    if num_examples < 2:
        raise ValueError(
            f"A covariance needs at least 2 feature vectors, got {num_examples}. Pass more "
            "examples.")
    if not np.all(np.isfinite(features)):
        raise ValueError(
            f"Features contain {np.sum(~np.isfinite(features))} NaN or Inf values. Check the "
            "images and the feature extractor.")
    if num_examples <= feature_dim:
        logging.warning(
            "Only %d feature vectors for feature dimension %d: the covariance is singular and "
            "the Frechet distance is unreliable. Use more examples than feature dimensions.",
            num_examples, feature_dim)
    mu = features.mean(axis=0)
    sigma = np.atleast_2d(np.cov(features, rowvar=False))
    return mu, sigma


def _check_statistics(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must have shape [feature_dim], got shape {mu.shape}.")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma{name} must have shape [feature_dim, feature_dim] = {(mu.shape[0],) * 2} to "
            f"match mu{name}, got shape {sigma.shape}.")
    for label, value in ((f"mu{name}", mu), (f"sigma{name}", sigma)):
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"{label} contains NaN or Inf. Check the features it was computed from.")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 0.0,
                     imag_rtol: float = 1e-3) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Args:
      mu1, mu2: means [D].
      sigma1, sigma2: covariances [D, D].
      eps: added to the diagonal of both covariances before the matrix square
        root. 0 computes the exact formula. A small value such as 1e-6 makes
        singular covariances (fewer examples than feature dimensions) usable,
        at the cost of a small bias.
      imag_rtol: the largest imaginary part of (sigma1 sigma2)^(1/2) accepted,
        relative to the largest absolute real entry. Rounding gives imaginary
        parts far below it. Larger ones mean a covariance is not positive
        semi-definite.

    Raises:
      ValueError: on NaN or Inf input, mismatched shapes, or a matrix square
        root that is not finite or has a large imaginary part.
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"The two feature sets have different dimensions: mu1 has shape {mu1.shape}, mu2 "
            f"has shape {mu2.shape}. Compute both with the same feature extractor.")
    if eps:
        offset = eps * np.eye(mu1.shape[0])
        sigma1, sigma2 = sigma1 + offset, sigma2 + offset

    diff = mu1 - mu2
    mean_term = diff @ diff
    trace_term = np.trace(sigma1) + np.trace(sigma2)

    # A feature that is constant in both sets (such as a ReLU unit that never
    # fires) has a zero row and column in both covariances. It adds nothing to
    # the trace terms, and removing it keeps sigma1 @ sigma2 from being singular.
    constant = (np.all(sigma1 == 0, axis=0) & np.all(sigma1 == 0, axis=1)
                & np.all(sigma2 == 0, axis=0) & np.all(sigma2 == 0, axis=1))
    sigma1, sigma2 = sigma1[~constant][:, ~constant], sigma2[~constant][:, ~constant]
    if not sigma1.size:
        return float(mean_term)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught):
        # Typical cause: a feature that is constant in one set only (a ReLU unit that never
        # fires on the samples). The square root of the singular product is still defined,
        # and the checks below reject it if it is not finite or not real.
        logging.info("sigma1 @ sigma2 is singular; %d of %d features are constant in one set.",
                     int(np.sum(np.all(sigma1 == 0, axis=0) | np.all(sigma2 == 0, axis=0))),
                     sigma1.shape[0])
    if not np.all(np.isfinite(covmean)):
        raise ValueError(
            "The matrix square root of sigma1 @ sigma2 contains NaN or Inf, which happens when "
            "a covariance is singular. Use more examples than feature dimensions or pass "
            "eps=1e-6.")
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(covmean.imag)))
        scale = max(float(np.max(np.abs(covmean.real))), np.finfo(np.float64).tiny)
        if max_imag > imag_rtol * scale:
            raise ValueError(
                f"The matrix square root of sigma1 @ sigma2 is complex (largest imaginary part "
                f"{max_imag:.3g}, largest real part {scale:.3g}), so a covariance is not "
                "positive semi-definite. Check that sigma1 and sigma2 are covariances, use more "
                "examples than feature dimensions, or pass eps=1e-6.")
        covmean = covmean.real

    distance = mean_term + trace_term - 2.0 * np.trace(covmean)
    # The exact value is >= 0, but rounding can leave a tiny negative one for identical sets.
    return max(float(distance), 0.0)


def frechet_distance_from_features(features1, features2, **kwargs) -> float:
    """Frechet distance between two feature sets [N1, D] and [N2, D] of any extractor.

    Keyword arguments are passed to `frechet_distance`.
    """
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2, **kwargs)


# Classifier outputs and accuracy.


@parallel.conv_jit(static_argnums=(0,))
def _apply_classifier(model: classifier_lib.Classifier, params, images):
    return model.apply({"params": params}, images, train=False)


def classifier_features_and_logits(model: classifier_lib.Classifier, params, images,
                                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Run the classifier over images [N, H, W, C] in batches.

    The last batch is zero-padded to the batch size, so every batch has the same
    shape and the classifier compiles once. Fewer than `batch_size` images run
    as one batch of their own size.

    Returns:
      (features [N, hidden_dim], logits [N, num_classes]) as float32 numpy arrays.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(
            f"Images must have shape [batch, height, width, channels], got shape {images.shape}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(images) == 0:
        raise ValueError("No images to classify: the image array is empty.")
    batch_size = min(batch_size, len(images))
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        num_valid = len(chunk)
        if num_valid < batch_size:
            padding = np.zeros((batch_size - num_valid, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, padding])
        chunk_logits, chunk_features = _apply_classifier(model, params, jnp.asarray(chunk))
        features.append(np.asarray(chunk_features)[:num_valid])
        logits.append(np.asarray(chunk_logits)[:num_valid])
    return np.concatenate(features), np.concatenate(logits)


def _check_labels(logits: np.ndarray, labels: np.ndarray) -> None:
    if logits.ndim != 2:
        raise ValueError(f"Logits must have shape [N, num_classes], got shape {logits.shape}.")
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"Labels must have shape [N] = ({logits.shape[0]},) to match the logits, got shape "
            f"{labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Labels must be integers, got dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"Labels must be in [0, {logits.shape[1]}), got values from {labels.min()} to "
            f"{labels.max()}.")


def accuracy(logits, labels) -> float:
    """Share of examples whose argmax over logits [N, K] equals the label [N]."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    _check_labels(logits, labels)
    if labels.size == 0:
        raise ValueError("Accuracy of zero examples is undefined. Pass at least one example.")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def per_class_accuracy(logits, labels) -> dict[int, float]:
    """Accuracy among the examples of each class present in labels [N]: {class: accuracy}."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    _check_labels(logits, labels)
    predictions = np.argmax(logits, axis=-1)
    return {
        int(c): float(np.mean(predictions[labels == c] == c)) for c in np.unique(labels)
    }


def evaluate_samples(classifier_model: classifier_lib.Classifier, params, sample_images,
                     sample_labels, reference_images, batch_size: int, **frechet_kwargs) -> dict:
    """Score class-conditional samples with the classifier.

    Args:
      classifier_model, params: the classifier and its parameters, e.g. from
        `load_classifier`.
      sample_images: generated images [N, H, W, C] in [-1, 1].
      sample_labels: the class each sample was generated for, int [N].
      reference_images: real images [M, H, W, C] in [-1, 1], e.g. the held-out split.
      batch_size: classifier batch size.
      **frechet_kwargs: passed to `frechet_distance` (`eps`, `imag_rtol`).

    Returns:
      dict with `sample_accuracy` (share of samples classified as their
      label), `frechet_distance` (between classifier features of the samples
      and of the reference images), `per_class_accuracy` ({class: accuracy}),
      `num_samples` and `num_reference`.
    """
    sample_images = np.asarray(sample_images, np.float32)
    reference_images = np.asarray(reference_images, np.float32)
    sample_labels = np.asarray(sample_labels)
    chex.assert_rank([sample_images, reference_images], 4)
    if sample_images.shape[1:] != reference_images.shape[1:]:
        raise ValueError(
            f"Samples have image shape {sample_images.shape[1:]} but reference images have "
            f"{reference_images.shape[1:]}. Resize one set to match the other.")
    sample_features, sample_logits = classifier_features_and_logits(
        classifier_model, params, sample_images, batch_size=batch_size)
    reference_features, _ = classifier_features_and_logits(
        classifier_model, params, reference_images, batch_size=batch_size)
    return {
        "sample_accuracy": accuracy(sample_logits, sample_labels),
        "frechet_distance": frechet_distance_from_features(
            sample_features, reference_features, **frechet_kwargs),
        "per_class_accuracy": per_class_accuracy(sample_logits, sample_labels),
        "num_samples": int(len(sample_images)),
        "num_reference": int(len(reference_images)),
    }


# Restoring the trained classifier.


def load_classifier(workdir: str) -> tuple[classifier_lib.Classifier, dict]:
    """Restore the classifier trained by `experiments.train_classifier` in `workdir`.

    Reads `config.json` for the model and optimizer and the latest checkpoint
    in `checkpoints/`. The parameters are replicated over all devices.

    Returns:
      (model, params).

    Raises:
      FileNotFoundError: `workdir` contains no classifier checkpoint or no config.json.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    config_path = os.path.join(workdir, "config.json")
    train_command = TRAIN_CLASSIFIER_COMMAND.format(workdir=workdir)
    # Checked before creating a Checkpointer, which would create the directory.
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(
            f"No classifier checkpoint directory {checkpoint_dir!r}. Train the classifier "
            f"first: {train_command}")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"No config.json in the classifier work directory {workdir!r}. It is written by "
            f"the classifier trainer: {train_command}")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))

    # The image shape and the class count are stored only in the checkpoint.
    reader = checkpointing.Checkpointer(checkpoint_dir, fingerprint={})
    step = reader.latest_step()
    if step is None:
        reader.close()
        raise FileNotFoundError(
            f"No checkpoint in {checkpoint_dir!r}. Train the classifier first: {train_command}")
    stored = reader.read_meta(step)["fingerprint"]
    reader.close()
    image_shape, num_classes = tuple(stored["image_shape"]), stored["num_classes"]

    model = classifier_lib.make_classifier(config.model, num_classes)
    tx = make_optimizer(config.optimizer, config.num_train_steps)
    init_fn = functools.partial(
        classifier_lib.init_state, model, tx, jax.random.key(0), image_shape)
    abstract = checkpointing.abstract_like(
        jax.eval_shape(init_fn), parallel.replicated(parallel.make_mesh()))
    checkpointer = checkpointing.Checkpointer(
        checkpoint_dir, fingerprint=classifier_lib.fingerprint(config.model, image_shape,
                                                              num_classes))
    state, _ = checkpointer.restore(abstract, step)
    checkpointer.close()
    logging.info("Loaded the classifier from step %d in %s.", step, checkpoint_dir)
    return model, state.params
