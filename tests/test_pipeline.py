"""End-to-end test of the main job on the tiny configuration.

One tiny pipeline run is shared by the tests. The numbers it reports are
meaningless (a few training steps), so the tests check the files, the report's
contents against the stage outputs, stage skipping, and DiT resumption.
"""

import json
import logging as std_logging
import os
import shutil

import numpy as np
import pytest
from experiments import pipeline
from experiments.configs import pipeline_mnist

pytestmark = [pytest.mark.xdist_group("pipeline"), pytest.mark.slow]


def _tiny_config(data_dir):
    config = pipeline_mnist.get_config("tiny")
    config.data_dir = str(data_dir)
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    workdir = root / "run"
    config = _tiny_config(root / "tfds")
    report = pipeline.run(config, str(workdir))
    return config, str(workdir), report


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def test_pipeline_writes_outputs(tiny_run):
    _, workdir, _ = tiny_run
    for name in ("report.md", "report.json", "loss_curves.png", "samples/samples.npz",
                 "samples/samples.png", "tokenizer/reconstructions.png",
                 "usage/codebook_usage.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    for stage in pipeline.STAGES:
        assert os.path.exists(os.path.join(workdir, stage, "stage.json")), stage


def test_pipeline_report_matches_stages(tiny_run):
    _, workdir, _ = tiny_run
    report = _read_json(os.path.join(workdir, "report.json"))
    tokenizer = _read_json(os.path.join(workdir, "tokenizer", "eval_metrics.json"))
    classifier = _read_json(os.path.join(workdir, "classifier", "eval_metrics.json"))
    assert report["tokenizer"]["psnr"] == pytest.approx(tokenizer["psnr"])
    assert report["tokenizer"]["codes_used_fraction"] == pytest.approx(
        tokenizer["codes_used_fraction"])
    assert report["classifier_accuracy"] == pytest.approx(classifier["accuracy"])
    assert set(report["stage_seconds"]) == set(pipeline.STAGES)
    for image in report["images"].values():
        assert os.path.exists(os.path.join(workdir, image)), image
    with open(os.path.join(workdir, "report.md")) as f:
        markdown = f.read()
    assert f"{report['tokenizer']['psnr']:.2f}" in markdown


def test_pipeline_samples_per_class(tiny_run):
    config, workdir, report = tiny_run
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as samples:
        images, labels = samples["images"], samples["labels"]
    per_class = config.dit.sample.per_class
    assert images.dtype == np.uint8
    assert images.shape == (10 * per_class, 28, 28, 1)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), per_class))
    # Sample accuracy is the share of argmax predictions equal to the label: a multiple of 1/N.
    assert report["sample_accuracy"] * len(labels) == pytest.approx(
        round(report["sample_accuracy"] * len(labels)))


def test_pipeline_rerun_skips_stages(tiny_run, caplog):
    config, workdir, _ = tiny_run
    before = {s: os.path.getmtime(os.path.join(workdir, s, "stage.json"))
              for s in pipeline.STAGES}
    caplog.set_level(std_logging.INFO)
    pipeline.run(config, workdir)
    messages = caplog.messages
    after = {s: os.path.getmtime(os.path.join(workdir, s, "stage.json"))
             for s in pipeline.STAGES}
    assert before == after
    skipped = [m for m in messages if "already done" in m]
    assert len(skipped) == len(pipeline.STAGES)


def test_pipeline_resumes_dit_stage(tiny_run, tmp_path, caplog):
    """A DiT stage that stopped after a checkpoint resumes from it on the next run."""
    config, workdir, _ = tiny_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    # Pretend the run was killed during the DiT stage: its record and later stages are
    # missing, its checkpoint (step 4) is there, and the config now requests more steps.
    for stage in ("dit", "samples", "evaluation"):
        os.remove(os.path.join(copy, stage, "stage.json"))
    config = config.copy_and_resolve_references()
    config.dit.num_train_steps = 6
    caplog.set_level(std_logging.INFO)
    report = pipeline.run(config, copy)
    messages = caplog.messages
    assert any("Resumed from the checkpoint at step 4" in m for m in messages)
    skipped = [m for m in messages if "already done" in m]
    assert len(skipped) == len(pipeline.STAGES) - 3
    record = _read_json(os.path.join(copy, "dit", "stage.json"))
    assert record["result"]["resumed_from"] == 4
    assert record["result"]["step"] == 6
    assert report["num_samples"] == 10 * config.dit.sample.per_class
    # The usage stage was recorded in the original work directory. The report links the
    # copy's own files.
    assert report["images"]["codebook_usage"] == os.path.join("usage", "codebook_usage.png")
    assert report["images"]["samples"] == os.path.join("samples", "samples.png")
    assert report["samples_npz"] == os.path.join(copy, "samples", "samples.npz")


def test_pipeline_rejects_changed_finished_stage(tiny_run, tmp_path):
    """A setting changed for a finished (skipped) stage raises instead of being ignored."""
    config, workdir, _ = tiny_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    with open(os.path.join(copy, "config.json")) as f:
        config_before = f.read()
    config = config.copy_and_resolve_references()
    config.dit.sample.guidance_scale = 1.0
    with pytest.raises(ValueError, match=r"stage 'dit'.*dit\.sample\.guidance_scale: 4\.0 -> 1\.0"):
        pipeline.run(config, copy)
    with open(os.path.join(copy, "config.json")) as f:
        assert f.read() == config_before
