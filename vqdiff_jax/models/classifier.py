"""A small convolutional classifier for MNIST-like images (Flax Linen).

It serves two evaluation purposes: its predicted class measures whether a
class-conditional sample shows the requested class, and its penultimate
activations are the feature space of the Frechet distance in
`vqdiff_jax.evaluation`.

Images are float32 in [-1, 1] with layout [batch, height, width, channels].
"""

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiff_jax.train_state import TrainState


class Classifier(nn.Module):
    """(3x3 conv, ReLU, 2x2 max pool) per entry of `conv_features`, then dense, ReLU, logits.

    Attributes:
      num_classes: number of output logits.
      conv_features: output channels of each conv block. Each block halves the
        height and width.
      hidden_dim: width of the penultimate layer, which is also the feature
        dimension returned for the Frechet distance.
      dropout_rate: dropout before the output layer during training. Dropout
        draws from the rng stream named 'dropout'.
    """

    num_classes: int = 10
    conv_features: Sequence[int] = (32, 64)
    hidden_dim: int = 128
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool):
        """Classify images [B, H, W, C].

        Returns:
          (logits [B, num_classes], features [B, hidden_dim]), the features being
          the post-ReLU penultimate activations, taken before dropout.
        """
        chex.assert_rank(x, 4)
        h = x
        for channels in self.conv_features:
            h = nn.relu(nn.Conv(channels, (3, 3))(h))
            h = nn.max_pool(h, (2, 2), strides=(2, 2))  # [B, H/2, W/2, channels]
        h = h.reshape(h.shape[0], -1)  # [B, h * w * channels]
        features = nn.relu(nn.Dense(self.hidden_dim)(h))  # [B, hidden_dim]
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        logits = nn.Dense(self.num_classes, name="logits")(h)
        return logits, features


def make_classifier(model_config, num_classes: int) -> Classifier:
    """Build the classifier from the `model` block of a classifier config."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if not model_config.conv_features or min(model_config.conv_features) < 1:
        raise ValueError(
            "model.conv_features must be a non-empty sequence of positive channel counts, "
            f"got {model_config.conv_features!r}.")
    if model_config.hidden_dim < 1:
        raise ValueError(f"model.hidden_dim must be >= 1, got {model_config.hidden_dim}.")
    if not 0.0 <= model_config.dropout_rate < 1.0:
        raise ValueError(f"model.dropout_rate must be in [0, 1), got {model_config.dropout_rate}.")
    return Classifier(
        num_classes=num_classes,
        conv_features=tuple(model_config.conv_features),
        hidden_dim=model_config.hidden_dim,
        dropout_rate=model_config.dropout_rate,
    )


def check_image_shape(model: Classifier, image_shape) -> None:
    """Reject images too small for the model's pooling, naming the minimum size."""
    height, width, _ = image_shape
    minimum = 2 ** len(model.conv_features)
    if height < minimum or width < minimum:
        raise ValueError(
            f"Images of size {height}x{width} are too small for {len(model.conv_features)} "
            f"conv blocks, which each halve the size. Use images of at least "
            f"{minimum}x{minimum} or fewer entries in model.conv_features.")


def init_params(model: Classifier, key: jax.Array, image_shape) -> dict:
    """Initialise parameters for images of shape [H, W, C]."""
    check_image_shape(model, image_shape)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return model.init(key, dummy, train=False)["params"]


def init_state(model: Classifier, tx, key: jax.Array, image_shape) -> TrainState:
    """Fresh train state (step 0, parameters, optimizer state) for images [H, W, C]."""
    params = init_params(model, key, image_shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def fingerprint(model_config, image_shape, num_classes: int) -> dict:
    """Fields that fix the structure of a saved classifier state.

    The image shape and class count are stored here because the checkpoint is
    the only place `vqdiff_jax.evaluation.load_classifier` can read them from.
    """
    return {
        "image_shape": [int(n) for n in image_shape],
        "num_classes": int(num_classes),
        "model": {
            "conv_features": [int(n) for n in model_config.conv_features],
            "hidden_dim": int(model_config.hidden_dim),
        },
    }
