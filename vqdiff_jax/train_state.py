"""The explicit train state shared by every trainer, and the optimizer factory."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a trainer needs to continue exactly where it stopped.

    Attributes:
      step: int32 scalar, the number of updates applied so far. It is the single
        source of truth for the learning-rate schedule, the RNG stream and the
        data position.
      params: trainable parameters.
      opt_state: optimizer state of `params`.
      ema_params: exponential moving average of `params`, or None when unused.
      vq: codebook and its EMA statistics (`quantizer.VQState`), or None. Not a
        trainable parameter: it is updated by the train step, never by the optimizer.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None
    vq: Any = None


def make_optimizer(config, num_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and global-norm clipping.

    Reads `learning_rate`, `warmup_steps`, `end_learning_rate_factor`, `b1`, `b2`,
    `weight_decay` and `grad_clip_norm` from the `optimizer` config block.
    """
    if config.learning_rate <= 0:
        raise ValueError(f"optimizer.learning_rate must be > 0, got {config.learning_rate}.")
    schedule = make_learning_rate_schedule(config, num_steps)
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay),
    )


def make_learning_rate_schedule(config, num_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=config.learning_rate * config.end_learning_rate_factor,
    )


def update_ema(ema_params, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree).astype(jnp.float32)
