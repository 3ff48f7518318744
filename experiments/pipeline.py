r"""The main job: every stage from raw images to a report, resumable.

  python -m experiments.pipeline --config=experiments/configs/pipeline_mnist.py \
      --workdir=workdirs/mnist

Stages run in order, each in its own sub-directory of --workdir:
  data        build or check the TFDS dataset
  tokenizer   train the VQ-VAE and evaluate it on the held-out split
  usage       codebook-usage histogram of the held-out codes
  classifier  train the evaluation classifier
  latents     encode the training images once with the tokenizer
  dit         train the DiT on the latents
  samples     generate images for every class (samples.npz, samples.png)
  evaluation  sample accuracy and Frechet distance under the classifier
A finished stage writes `<stage>/stage.json` and is skipped on the next run,
so an interrupted run continues where it stopped; a stage killed half-way
resumes from its own last checkpoint. At the end, `report.md` and
`report.json` summarise the run.
"""

import json
import os
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common, sample_dit, train_classifier, train_dit, train_tokenizer
from experiments import report as report_lib
from vqdiff_jax import checkpointing, evaluation, parallel
from vqdiff_jax.data import pipeline as data_pipeline


STAGES = ("data", "tokenizer", "usage", "classifier", "latents", "dit", "samples", "evaluation")


def _stage_record_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "stage.json")


def _as_json(block) -> dict:
    """Convert a config block to plain JSON values, which compare equal to a stored record."""
    return json.loads(block.to_json_best_effort(sort_keys=True))


def stage_settings(config) -> dict[str, dict]:
    """Return, per stage, the part of the pipeline config that its result depends on."""
    tokenizer, classifier, dit = (_as_json(config.tokenizer), _as_json(config.classifier),
                                  _as_json(config.dit))
    return {
        "data": {"data": tokenizer["data"]},
        "tokenizer": {"tokenizer": tokenizer},
        "usage": {"tokenizer": tokenizer},
        "classifier": {"classifier": classifier},
        "latents": {"tokenizer": tokenizer, "encode_batch_size": dit["encode_batch_size"]},
        "dit": {"tokenizer": tokenizer, "dit": dit},
        "samples": {"tokenizer": tokenizer, "dit": dit},
        "evaluation": {"tokenizer": tokenizer, "classifier": classifier, "dit": dit,
                       "eval_batch_size": config.eval_batch_size},
    }


def check_finished_stages(settings: dict[str, dict], workdir: str) -> None:
    """Raise if a finished stage in `workdir` was run with other `settings` than these.

    Finished stages are skipped, so a changed setting would silently not take effect.
    """
    for stage in STAGES:
        path = _stage_record_path(os.path.abspath(os.path.expanduser(workdir)), stage)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            recorded = json.load(f).get("settings")
        if recorded is None:  # Records written before settings were stored.
            continue
        changed = [f"{key}: {old!r} -> {new!r}" for key, old, new in
                   checkpointing.nested_differences(recorded, settings[stage])]
        if changed:
            listed = "; ".join(changed[:8]) + ("; ..." if len(changed) > 8 else "")
            raise ValueError(
                f"The finished stage '{stage}' in {workdir} was run with other settings "
                f"({listed}). Finished stages are skipped, so the change would not take "
                f"effect. Use a new --workdir, or delete {os.path.dirname(path)} and the "
                "directories of the stages after it to run them again.")


def run_stage(workdir: str, stage: str, fn, settings: dict | None = None) -> dict:
    """Run `fn()` unless `<stage>/stage.json` exists; record its result, wall time and settings."""
    path = _stage_record_path(workdir, stage)
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        logging.info("[pipeline] stage %-10s already done (%.1f s); skipping.", stage,
                     record["wall_seconds"])
        return record
    logging.info("[pipeline] stage %-10s starting.", stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = time.perf_counter()
    result = fn()
    record = {"stage": stage, "wall_seconds": time.perf_counter() - start, "result": result,
              "settings": settings}
    common.write_json(path, record)
    logging.info("[pipeline] stage %-10s done in %.1f s.", stage, record["wall_seconds"])
    return record


def run(config, workdir: str) -> dict:
    """Run every stage in `workdir`; return the report dictionary."""
    settings = stage_settings(config)
    check_finished_stages(settings, workdir)
    workdir = common.prepare_workdir(config, workdir, "pipeline")
    stage_dir = lambda name: os.path.join(workdir, name)  # noqa: E731
    records = {}

    def prepare():
        info = common.prepare_data(config.tokenizer.data)
        return {"dataset": info.name, "image_shape": list(info.image_shape),
                "num_classes": info.num_classes, "split_sizes": dict(info.split_sizes)}

    records["data"] = run_stage(workdir, "data", prepare, settings["data"])
    records["tokenizer"] = run_stage(
        workdir, "tokenizer",
        lambda: train_tokenizer.train_and_evaluate(config.tokenizer, stage_dir("tokenizer")),
        settings["tokenizer"])
    records["usage"] = run_stage(
        workdir, "usage",
        lambda: report_lib.plot_codebook_usage(
            records["tokenizer"]["result"]["code_counts"],
            os.path.join(stage_dir("usage"), "codebook_usage.png")),
        settings["usage"])
    records["classifier"] = run_stage(
        workdir, "classifier",
        lambda: train_classifier.train_and_evaluate(config.classifier, stage_dir("classifier")),
        settings["classifier"])

    latents_path = os.path.join(stage_dir("latents"), "latents.npz")

    def encode():
        tok_model, tok_state, tok_config = train_tokenizer.load_tokenizer(stage_dir("tokenizer"))
        latents, labels = train_dit.encode_training_set(
            tok_model, tok_state, tok_config, latents_path, config.dit.encode_batch_size)
        return {"path": latents_path, "shape": list(latents.shape),
                "num_labels": int(len(labels))}

    records["latents"] = run_stage(workdir, "latents", encode, settings["latents"])

    dit_config = config.dit.copy_and_resolve_references()
    dit_config.tokenizer_workdir = stage_dir("tokenizer")
    dit_config.latents_path = latents_path
    records["dit"] = run_stage(
        workdir, "dit", lambda: train_dit.train_and_evaluate(dit_config, stage_dir("dit")),
        settings["dit"])
    records["samples"] = run_stage(
        workdir, "samples",
        lambda: sample_dit.sample_to_dir(stage_dir("dit"), stage_dir("samples")),
        settings["samples"])

    def evaluate():
        classifier_model, params = evaluation.load_classifier(stage_dir("classifier"))
        with np.load(records["samples"]["result"]["npz"]) as samples:
            images = samples["images"].astype(np.float32) / 127.5 - 1.0
            labels = samples["labels"]
        reference, _ = data_pipeline.load_split_as_arrays(
            config.dataset, config.classifier.data.eval_split, config.data_dir,
            image_size=config.classifier.data.image_size, crop=config.classifier.data.crop)
        result = evaluation.evaluate_samples(
            classifier_model, params, images, labels, reference,
            batch_size=config.eval_batch_size)
        result["per_class_accuracy"] = {str(k): v for k, v in
                                        result["per_class_accuracy"].items()}
        return result

    records["evaluation"] = run_stage(workdir, "evaluation", evaluate, settings["evaluation"])

    report = report_lib.write_report(config, workdir, records)
    report_lib.log_summary(report)
    return report


def main(argv):
    del argv
    common.configure_logging()
    # jax.distributed must start before anything initialises the XLA backend; every stage
    # shares the tokenizer stage's distributed settings.
    parallel.maybe_initialize_distributed(flags.FLAGS.config.tokenizer)
    jnp.zeros(())  # Initialise the JAX backend before TensorFlow claims devices.
    run(flags.FLAGS.config, flags.FLAGS.workdir)


def define_flags() -> None:
    """Define the command-line flags; called only when the module runs as a script."""
    config_flags.DEFINE_config_file("config", None, "Pipeline config file.")
    flags.DEFINE_string("workdir", None, "Work directory of the whole pipeline.")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
