"""Metric logging: JSON lines, TensorBoard summaries and a console progress display.

Only process 0 writes. Metric names are namespaced (`train/loss`, `eval/psnr`,
`vq/perplexity`); TensorBoard event files go to `<workdir>/tensorboard` and one
JSON object per logged step to `<workdir>/metrics.jsonl`.
"""

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging


def _to_float(value) -> float:
    return float(np.asarray(jax.device_get(value)))


class MetricWriter:
    """Write scalar metrics to `metrics.jsonl` and TensorBoard under `workdir`.

    A resumed run passes `start_step`, the step of its checkpoint. Lines of later
    steps, written by a run that stopped before its next checkpoint, are removed
    first because the resumed run writes those steps again. A line cut short by a
    crash is removed too.

    NOTE: TensorBoard event files are not rewritten, so TensorBoard can show two
    values for the steps between a crash and the checkpoint before it.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, start_step: int | None = None):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if start_step is not None and os.path.exists(self._jsonl_path):
            _drop_lines_after(self._jsonl_path, start_step)
        self._jsonl = open(self._jsonl_path, "a")
        if tensorboard:
            import tensorflow as tf  # Imported lazily: TensorFlow start-up is slow.

            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._active:
            return
        values = {name: _to_float(value) for name, value in scalars.items()}
        try:
            self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
            self._jsonl.flush()
        except OSError as e:
            raise OSError(
                e.errno,
                f"Writing the metrics of step {step} to {self._jsonl_path!r} failed: "
                f"{e.strerror or e}. Free disk space or choose another --workdir.",
            ) from e
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for name, value in values.items():
                    tf.summary.scalar(name, value)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            try:
                self._jsonl.close()
            except OSError as e:
                # Only lines whose write_scalars call already raised can be left unwritten.
                logging.warning("Closing %s failed: %s", self._jsonl_path, e)
        if self._tb is not None:
            self._tb.close()


def _drop_lines_after(path: str, step: int) -> None:
    """Rewrite the JSON lines file `path` without lines of steps after `step` or invalid lines."""
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        logging.info("Removed %d line(s) after step %d from %s before resuming.", dropped, step,
                     path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
    """Read back every JSON line written by `MetricWriter` in `workdir`."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Console progress: steps/s, ETA and a few metrics, through absl logging.

    The rate counts only steps after the first one logged, so compilation time
    does not distort it.
    """

    def __init__(self, total_steps: int, *, name: str, start_step: int = 0):
        self.total_steps = total_steps
        self.name = name
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self.steps_per_sec = float("nan")

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> float:
        """Log progress at `step` and return the steps/s since the last call."""
        now = time.perf_counter()
        if step > self._last_step:
            self.steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        remaining = self.total_steps - step
        eta = remaining / self.steps_per_sec if self.steps_per_sec > 0 else float("nan")
        shown = ", ".join(f"{k}={_to_float(v):.4g}" for k, v in (metrics or {}).items())
        percent = 100.0 * step / max(self.total_steps, 1)
        if jax.process_index() == 0:
            logging.info(
                "[%s] step %d/%d (%.0f%%) %.2f steps/s, ETA %s%s",
                self.name, step, self.total_steps, percent, self.steps_per_sec,
                format_seconds(eta), f" | {shown}" if shown else "",
            )
        return self.steps_per_sec


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def check_finite(step: int, metrics: Mapping[str, float], names: tuple[str, ...]) -> None:
    """Raise FloatingPointError naming the step and every metric of `names` that is NaN or Inf.

    Names missing from `metrics` are skipped.
    """
    bad = {}
    for name in names:
        if name in metrics:
            value = _to_float(metrics[name])
            if not math.isfinite(value):
                bad[name] = value
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise FloatingPointError(
            f"Non-finite training metric at step {step}: {terms}. Training stopped before "
            "saving this step; the last checkpoint is kept. Lower the learning rate or check "
            "the input data."
        )


def every(step: int, period: int | None, *, total: int | None = None) -> bool:
    """True at steps that are multiples of `period` (and at the last step, if `total`)."""
    if total is not None and step == total:
        return True
    return bool(period) and step % period == 0
