"""Frechet distance and accuracy against closed forms and numpy references."""

import warnings

import jax
import numpy as np
import pytest

from vqdiff_jax import evaluation
from vqdiff_jax.models import classifier as classifier_lib


def _reference_frechet(mu1, sigma1, mu2, sigma2):
    """Frechet distance with tr((s1 s2)^(1/2)) = tr((A s2 A)^(1/2)), A = s1^(1/2).

    A s2 A is symmetric positive semi-definite, so both square roots come from
    `np.linalg.eigh`, independently of scipy's general `sqrtm`.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sum(np.sqrt(np.clip(inner, 0, None)))
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root


def _random_covariance(rng, dim):
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def test_frechet_1d_closed_form():
    for mu1, s1, mu2, s2 in [(0.0, 1.0, 0.0, 1.0), (1.0, 4.0, -2.0, 0.25), (3.0, 2.0, 0.5, 9.0)]:
        expected = (mu1 - mu2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)
        got = evaluation.frechet_distance([mu1], [[s1]], [mu2], [[s2]])
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = evaluation.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_full_covariance_vs_eigh():
    rng = np.random.default_rng(1)
    dim = 6
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    expected = _reference_frechet(mu1, sigma1, mu2, sigma2)
    got = evaluation.frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    sigma1, sigma2 = _random_covariance(rng, 4), _random_covariance(rng, 4)
    forward = evaluation.frechet_distance(mu1, sigma1, mu2, sigma2)
    backward = evaluation.frechet_distance(mu2, sigma2, mu1, sigma1)
    np.testing.assert_allclose(forward, backward, rtol=1e-9)


def test_frechet_identical_sets_zero():
    features = np.random.default_rng(3).normal(size=(200, 16))
    assert evaluation.frechet_distance_from_features(features, features) < 1e-8


def test_frechet_shifted_sets():
    # Shifting every vector by `shift` leaves the covariance unchanged, so d^2 = |shift|^2.
    features = np.random.default_rng(4).normal(size=(300, 8))
    shift = np.arange(8) * 0.5
    got = evaluation.frechet_distance_from_features(features, features + shift)
    np.testing.assert_allclose(got, shift @ shift, rtol=1e-8)


def test_frechet_constant_feature():
    # Column 2 is zero in both sets, like a ReLU unit that never fires, so its
    # covariance row and column are zero and sigma1 @ sigma2 is singular.
    rng = np.random.default_rng(9)
    features1, features2 = rng.normal(size=(100, 4)), rng.normal(size=(120, 4)) + 1.0
    features1[:, 2] = features2[:, 2] = 0.0
    expected = _reference_frechet(
        features1.mean(0), np.cov(features1.T), features2.mean(0), np.cov(features2.T))
    got = evaluation.frechet_distance_from_features(features1, features2)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_all_constant_features():
    features1, features2 = np.zeros((5, 3)), np.ones((7, 3))
    assert evaluation.frechet_distance_from_features(features1, features2) == pytest.approx(3.0)


@pytest.mark.parametrize("dim", [1, 2, 7, 64])
def test_frechet_any_feature_dim(dim):
    rng = np.random.default_rng(dim)
    features1 = rng.normal(size=(400, dim))
    features2 = 1.5 * rng.normal(size=(300, dim)) + 0.3
    mu1, mu2 = features1.mean(0), features2.mean(0)
    sigma1 = np.atleast_2d(np.cov(features1.T))
    sigma2 = np.atleast_2d(np.cov(features2.T))
    expected = _reference_frechet(mu1, sigma1, mu2, sigma2)
    got = evaluation.frechet_distance_from_features(features1, features2)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_feature_statistics_vs_numpy():
    features = np.random.default_rng(5).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = evaluation.feature_statistics(features)
    centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
    assert mu.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)


def test_feature_statistics_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluation.feature_statistics(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="shape"):
        evaluation.feature_statistics(np.zeros((4, 2, 2)))


def test_frechet_nan_input_raises():
    sigma = np.eye(2)
    with pytest.raises(ValueError, match="mu1 contains NaN"):
        evaluation.frechet_distance([np.nan, 0.0], sigma, [0.0, 0.0], sigma)
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        evaluation.frechet_distance([0.0, 0.0], sigma, [0.0, 0.0], np.full((2, 2), np.nan))


def test_frechet_complex_sqrtm_raises():
    # diag(1, -1) is no covariance: sqrtm(sigma1 @ sigma2) = diag(1, i).
    with pytest.raises(ValueError, match="complex"):
        evaluation.frechet_distance([0.0, 0.0], np.eye(2), [0.0, 0.0], np.diag([1.0, -1.0]))


def test_frechet_shape_mismatch_raises():
    with pytest.raises(ValueError, match="different dimensions"):
        evaluation.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma1 must have shape"):
        evaluation.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_frechet_eps_offset():
    # With eps, both covariances get eps on the diagonal before the square root.
    got = evaluation.frechet_distance([0.0], [[1.0]], [0.0], [[4.0]], eps=0.5)
    expected = 1.5 + 4.5 - 2 * np.sqrt(1.5 * 4.5)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_accuracy_vs_numpy():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(100, 10))
    labels = rng.integers(0, 10, size=100)
    labels[:30] = np.argmax(logits[:30], axis=1)  # At least 30 correct.
    expected = np.sum([np.argmax(row) == y for row, y in zip(logits, labels)]) / 100
    assert evaluation.accuracy(logits, labels) == pytest.approx(expected)
    assert evaluation.accuracy(logits, np.argmax(logits, axis=1)) == 1.0


def test_per_class_accuracy_hand_worked():
    logits = np.eye(3)[[0, 1, 1, 2, 0]]  # Predictions 0, 1, 1, 2, 0.
    labels = np.array([0, 1, 2, 2, 2])
    got = evaluation.per_class_accuracy(logits, labels)
    assert got == {0: 1.0, 1: 1.0, 2: pytest.approx(1 / 3)}


def test_accuracy_rejects_bad_labels():
    logits = np.zeros((4, 3))
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        evaluation.accuracy(logits, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        evaluation.accuracy(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="integers"):
        evaluation.accuracy(logits, np.array([0.0, 1.0, 2.0, 0.0]))


def _small_classifier():
    model = classifier_lib.Classifier(num_classes=10, conv_features=(4,), hidden_dim=8)
    params = classifier_lib.init_params(model, jax.random.key(0), (8, 8, 1))
    return model, params


def test_batched_features_match_one_batch():
    model, params = _small_classifier()
    images = np.random.default_rng(7).uniform(-1, 1, size=(11, 8, 8, 1)).astype(np.float32)
    features, logits = evaluation.classifier_features_and_logits(
        model, params, images, batch_size=4)
    expected_logits, expected_features = model.apply({"params": params}, images, train=False)
    assert features.shape == (11, 8)
    assert logits.shape == (11, 10)
    np.testing.assert_allclose(features, expected_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)


def test_evaluate_samples_keys_and_values():
    model, params = _small_classifier()
    rng = np.random.default_rng(8)
    samples = rng.uniform(-1, 1, size=(40, 8, 8, 1)).astype(np.float32)
    reference = rng.uniform(-1, 1, size=(60, 8, 8, 1)).astype(np.float32)
    _, logits = evaluation.classifier_features_and_logits(model, params, samples, batch_size=16)
    labels = np.argmax(logits, axis=1)
    labels[:10] = (labels[:10] + 1) % 10  # Exactly 10 of 40 misclassified.
    result = evaluation.evaluate_samples(model, params, samples, labels, reference, 16)
    assert result["sample_accuracy"] == pytest.approx(0.75)
    assert result["num_samples"] == 40
    assert result["num_reference"] == 60
    assert set(result["per_class_accuracy"]) == set(np.unique(labels).tolist())
    assert np.isfinite(result["frechet_distance"])
    assert result["frechet_distance"] > 0


def test_load_classifier_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        evaluation.load_classifier(str(tmp_path / "no_such_run"))
    assert not (tmp_path / "no_such_run").exists()


def test_frechet_feature_constant_in_one_set():
    """A feature constant in one set only makes sigma1 @ sigma2 singular: no warning, exact value.

    sigma1 = diag(1, 0), sigma2 = diag(4, 9): (sigma1 sigma2)^(1/2) = diag(2, 0), so the distance
    is |mu1 - mu2|^2 + (1 + 0) + (4 + 9) - 2 * 2 = 1 + 10 = 11 for mu1 - mu2 = (1, 0).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = evaluation.frechet_distance(
            np.array([1.0, 0.0]), np.diag([1.0, 0.0]), np.zeros(2), np.diag([4.0, 9.0]))
    assert value == pytest.approx(11.0, abs=1e-6)
