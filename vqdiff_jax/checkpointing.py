"""Orbax checkpoints with automatic resume and a config-compatibility check.

Each checkpoint step directory contains two items: `state` (the train-state pytree)
and `meta` (JSON: the config fields that fix the state's structure, plus
anything else the trainer needs to resume, such as latent statistics). Orbax
writes a step into a temporary directory and renames it when complete, so a
process killed during a save leaves the previous checkpoint as the latest one.

Resume order: the run's own checkpoint directory if it holds a checkpoint,
otherwise fresh initialisation.
"""

import json
import os
import re

import jax
import orbax.checkpoint as ocp
from absl import logging


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in a work directory was written with an incompatible config."""


def check_writable(directory: str) -> None:
    """Raise a clear error if `directory` cannot be created or written."""
    probe = os.path.join(directory, f".write_probe_{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        try:
            with open(probe, "w") as f:
                f.write("ok")
        finally:
            if os.path.lexists(probe):
                os.remove(probe)
    except OSError as e:
        raise OSError(
            f"Cannot write to the work directory {directory!r}: {e.strerror or e}. Choose a "
            "writable --workdir with free disk space."
        ) from e


def _as_os_error(error: Exception) -> OSError | None:
    """Return the OSError behind a failed Orbax write, or None for other errors.

    Orbax writes arrays through TensorStore, which reports a failed write as a
    ValueError with the system error number in the text, e.g. "RESOURCE_EXHAUSTED:
    ... No space left on device [os_error_code='28']" (TensorStore as used by
    orbax-checkpoint 0.12).
    """
    if isinstance(error, OSError):
        return error
    match = re.search(r"os_error_code='(\d+)'", str(error))
    if isinstance(error, ValueError) and match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def nested_differences(expected: dict, found: dict, prefix: str = "") -> list[tuple]:
    """List (dotted key, expected value, found value) where two nested dicts differ."""
    differences = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<missing>"), found.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            differences += nested_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append((f"{prefix}{key}", a, b))
    return differences


def _diff(expected: dict, found: dict) -> list[str]:
    return [f"{key}: checkpoint has {b!r}, config has {a!r}"
            for key, a, b in nested_differences(expected, found)]


class Checkpointer:
    """One `ocp.CheckpointManager` for a trainer's state and metadata.

    Args:
      directory: where step directories are written.
      fingerprint: JSON-serialisable config fields that determine the state's
        structure. A checkpoint written with a different fingerprint is rejected
        on restore with IncompatibleCheckpointError. None skips the check, for
        readers that take the structure from the stored fingerprint.
      max_to_keep: number of most recent checkpoints kept.
    """

    def __init__(self, directory: str, *, fingerprint: dict | None, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        check_writable(self.directory)
        # Round-trip through JSON so tuples compare equal to the lists read back.
        self.fingerprint = json.loads(json.dumps(fingerprint))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self._failed_step: int | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, extra_meta: dict | None = None) -> None:
        """Save `state` as step `step` and wait until it is complete on disk.

        A failed write, such as one to a full disk, raises OSError with the system
        error number. The unfinished step is never listed as a checkpoint, so the
        earlier ones stay the latest. After a failed save, `save` raises
        RuntimeError, because Orbax threads of the failed save may still be
        writing. A new process resumes from the last complete checkpoint.
        """
        if self._failed_step is not None:
            raise RuntimeError(
                f"Saving the checkpoint for step {self._failed_step} in {self.directory!r} "
                "failed earlier, so this Checkpointer saves nothing more. Restart the "
                "process: it resumes from the last complete checkpoint."
            )
        if self.fingerprint is None:
            raise ValueError("A Checkpointer without a fingerprint only reads; pass the "
                             "config fingerprint to save checkpoints.")
        meta = {"fingerprint": self.fingerprint, "step": int(step), **(extra_meta or {})}
        try:
            self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as e:
            self._failed_step = int(step)
            os_error = _as_os_error(e)
            if os_error is None:
                raise
            raise OSError(
                os_error.errno,
                f"Saving the checkpoint for step {step} in {self.directory!r} failed: "
                f"{os_error.strerror or e}. Free disk space or choose another --workdir; "
                "earlier checkpoints are intact.",
            ) from e
        logging.info("Saved checkpoint for step %d in %s.", step, self.directory)

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory!r}.")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def check_compatible(self, step: int) -> dict:
        meta = self.read_meta(step)
        if self.fingerprint is None:
            return meta
        differences = _diff(self.fingerprint, meta.get("fingerprint", {}))
        if differences:
            raise IncompatibleCheckpointError(
                f"The checkpoint at step {step} in {self.directory!r} was written with a "
                "different config:\n  " + "\n  ".join(differences) + "\nUse a new --workdir, "
                "or run with the config that wrote the checkpoint."
            )
        return meta

    def restore(self, abstract_state, step: int | None = None):
        """Restore (state, meta) at `step` (the latest by default) onto `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings,
        e.g. from `jax.eval_shape` of the init function.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory!r}.")
        self.check_compatible(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree, sharding):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), all with `sharding`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )
