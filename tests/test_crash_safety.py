"""SIGKILL of the tokenizer trainer at any moment, then the same command again.

The trainer is killed twice: first while it writes a checkpoint (as soon as an
`*.orbax-checkpoint-tmp` directory appears), then at a random moment after its
next checkpoint. After each kill the latest complete checkpoint must load, and
the unchanged command must resume from it. The run that finally completes must
end bitwise equal to the uninterrupted reference run (helpers.runs).
"""

import json
import random
import signal
import time

import pytest
from helpers import runs, trees

from vqdiff_jax import checkpointing, metric_writers

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _saving_step(workdir, min_step):
    """Return the step of a checkpoint being written, if it is >= `min_step`."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return None
    for path in directory.iterdir():
        step = path.name.split(".")[0]
        if TMP_SUFFIX in path.name and step.isdigit() and int(step) >= min_step:
            return int(step)
    return None


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the trainer exited before it was killed"


def _check_latest_loadable(workdir):
    """Return the latest complete step after checking that it restores."""
    steps = runs.checkpoint_steps(workdir)
    assert steps, "no complete checkpoint left"
    latest = steps[-1]
    # Orbax's own listing skips the temporary directory of the interrupted save.
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", fingerprint={})
    assert checkpointer.latest_step() == latest
    checkpointer.close()
    state = runs.load_state(workdir, latest)
    assert int(state["step"]) == latest
    assert runs.load_meta(workdir, latest)["step"] == latest
    return latest


@pytest.mark.slow
def test_kill_and_rerun_resumes(tmp_path, tmp_path_factory):
    reference = runs.tokenizer_reference(tmp_path_factory)
    workdir = tmp_path / "run"
    # Keeping 2 checkpoints also exercises the deletion of old ones during the kills.
    cmd = runs.command(runs.TOKENIZER, runs.tokenizer_flags(
        workdir, runs.data_dir(tmp_path_factory), "--config.max_checkpoints=2"))
    env = runs.trainer_env(tmp_path_factory)
    delay_s = random.Random(0).uniform(0.0, 0.3)

    # Kill 1: while the checkpoint of step 2 or later is being written.
    log_path = tmp_path / "run1.log"
    proc = runs.start(cmd, env, log_path)
    saving = runs.wait_until(lambda: _saving_step(workdir, min_step=2), proc, log_path)
    _kill(proc)
    latest = _check_latest_loadable(workdir)
    # The save seen in progress may have finished before the signal arrived.
    assert latest in (saving - 1, saving)

    # Kill 2: the same command resumes, and is killed at a random moment after its next
    # checkpoint.
    log_path = tmp_path / "run2.log"
    proc = runs.start(cmd, env, log_path)
    runs.wait_until(lambda: runs.checkpoint_steps(workdir)[-1] > latest, proc, log_path)
    time.sleep(delay_s)
    _kill(proc)
    assert f"Resumed from the checkpoint at step {latest} " in log_path.read_text()
    resumed_from = latest
    latest = _check_latest_loadable(workdir)
    assert resumed_from < latest <= runs.NUM_STEPS

    # The same command again runs to the end.
    output = runs.run(cmd, env, tmp_path / "run3.log")
    assert f"Resumed from the checkpoint at step {latest} " in output
    assert runs.checkpoint_steps(workdir)[-1] == runs.NUM_STEPS
    final = runs.load_state(workdir, runs.NUM_STEPS)
    expected = runs.load_state(reference, runs.NUM_STEPS)
    assert trees.bitwise_differences(final, expected) == []
    # Steps logged before a kill but after the last checkpoint are not logged twice.
    assert runs.train_metric_steps(workdir) == list(range(1, runs.NUM_STEPS + 1))
    assert _train_losses(workdir) == _train_losses(reference)


def _train_losses(workdir):
    rows = metric_writers.read_metrics(str(workdir))
    return [{name: value for name, value in row.items() if name != "train/steps_per_sec"}
            for row in rows if "train/loss" in row]


def test_metric_writer_drops_later_steps(tmp_path):
    # Steps 1-5 were logged, then the run was killed while writing step 6.
    lines = [json.dumps({"step": step, "train/loss": float(step)}) for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "train/lo')

    writer = metric_writers.MetricWriter(str(tmp_path), tensorboard=False, start_step=3)
    writer.write_scalars(4, {"train/loss": 40.0})
    writer.close()
    appending = metric_writers.MetricWriter(str(tmp_path), tensorboard=False)
    appending.write_scalars(5, {"train/loss": 50.0})
    appending.close()

    rows = metric_writers.read_metrics(str(tmp_path))
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["train/loss"] for row in rows] == [1.0, 2.0, 3.0, 40.0, 50.0]
