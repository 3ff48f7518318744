"""The training loop shared by the tokenizer, DiT and classifier trainers.

Each experiment builds its mesh, data, model, optimizer and jitted step, then
hands them to `train_loop`, which owns cadence (logging, evaluation, saving),
the non-finite check and the progress display.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging

from vqdiff_jax import metric_writers
from vqdiff_jax.checkpointing import Checkpointer, IncompatibleCheckpointError


@dataclasses.dataclass
class LoopConfig:
    name: str
    num_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int | None = None
    # Loss terms checked for NaN/Inf after every step, besides STATE_NORM_NAMES.
    loss_names: tuple[str, ...] = ("train/loss",)


# Checked after every step when the step reports them: a NaN or Inf gradient can
# leave the loss of its own step finite but the updated parameters not.
STATE_NORM_NAMES = ("train/grad_norm", "train/param_norm")


def restore_or_init(checkpointer: Checkpointer, init_state: Callable[[], Any], state_sharding,
                    *, batch_size: int | None = None):
    """Resume from the latest checkpoint in the run's directory, or initialise.

    Returns (state, meta), meta being {} for a fresh state. The abstract state
    comes from `jax.eval_shape(init_state)`, so restoring never runs the init.
    With `batch_size`, a checkpoint whose `data_position` is not its step times
    `batch_size` raises IncompatibleCheckpointError (see `check_data_position`).
    """
    step = checkpointer.latest_step()
    if step is None:
        logging.info("No checkpoint in %s; starting from scratch.", checkpointer.directory)
        state = jax.jit(init_state, out_shardings=state_sharding)()
        return state, {}
    abstract = jax.eval_shape(init_state)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sharding
    )
    state, meta = checkpointer.restore(abstract, step)
    restored_step = int(jax.device_get(state.step))
    if restored_step != step:
        raise ValueError(
            f"The checkpoint labelled step {step} in {checkpointer.directory!r} contains "
            f"state.step={restored_step}, so its directory was renamed or written by other "
            "code. Remove it to resume from the previous checkpoint."
        )
    if batch_size is not None:
        check_data_position(meta, step, batch_size)
    logging.info("Resumed from the checkpoint at step %d in %s.", step, checkpointer.directory)
    return state, meta


def check_data_position(meta: dict, step: int, batch_size: int) -> None:
    """Raise IncompatibleCheckpointError unless the checkpoint resumes the data at step * batch_size.

    Trainers save `data_position`, the number of examples consumed, with every
    checkpoint. The data stream restarts at example `step * batch_size`, so a
    batch size changed since the save would silently skip or repeat examples.
    Metadata without `data_position` passes.
    """
    position = meta.get("data_position")
    if position is None or position == step * batch_size:
        return
    raise IncompatibleCheckpointError(
        f"The checkpoint at step {step} was saved after {position} training examples, but "
        f"resuming with batch_size={batch_size} would continue at example "
        f"{step * batch_size}. Use the batch size that wrote the checkpoint "
        f"({position // step if step else '?'}), or a new --workdir."
    )


def train_loop(
    loop: LoopConfig,
    state,
    train_step: Callable,
    batches: Iterator[dict],
    *,
    checkpointer: Checkpointer,
    writer: metric_writers.MetricWriter,
    eval_fn: Callable[[Any, int], dict] | None = None,
    checkpoint_meta: Callable[[int], dict] | None = None,
):
    """Run `train_step` from `state.step` to `loop.num_steps`; return the final state.

    Metrics of step s are read back while step s+1 runs, so the host never
    stalls the device. A NaN or Inf loss term, gradient norm or parameter norm
    raises FloatingPointError naming the step and the metric, before the state
    of that step or any later one is saved.
    """
    step = int(jax.device_get(state.step))
    progress = metric_writers.Progress(loop.num_steps, name=loop.name, start_step=step)
    pending = None  # (step, metrics) of the previous step, not yet read back.

    def flush(pending):
        done_step, metrics = pending
        metrics = jax.device_get(metrics)
        metric_writers.check_finite(done_step, metrics, loop.loss_names + STATE_NORM_NAMES)
        if metric_writers.every(done_step, loop.log_every, total=loop.num_steps):
            steps_per_sec = progress.update(done_step, {k: metrics[k] for k in loop.loss_names})
            writer.write_scalars(done_step, {**metrics, "train/steps_per_sec": steps_per_sec})

    while step < loop.num_steps:
        batch = next(batches)
        state, metrics = train_step(state, batch)
        step += 1
        if pending is not None:
            flush(pending)
        pending = (step, metrics)

        save = metric_writers.every(step, loop.checkpoint_every, total=loop.num_steps)
        evaluate = eval_fn is not None and metric_writers.every(
            step, loop.eval_every, total=loop.num_steps)
        if save or evaluate:
            flush(pending)
            pending = None
        if save:
            checkpointer.save(step, state, checkpoint_meta(step) if checkpoint_meta else None)
        if evaluate:
            writer.write_scalars(step, eval_fn(state, step))
    if pending is not None:
        flush(pending)
    return state
