"""The pipeline's report: plots, `report.json`, `report.md` and a console summary."""

import json
import os
import platform

import jax
import numpy as np
from absl import logging
# Figure without pyplot draws to files and leaves the notebook backend untouched.
from matplotlib.figure import Figure

from experiments import common
from vqdiff_jax import metric_writers


def plot_codebook_usage(code_counts, path: str) -> dict:
    """Bar chart of held-out code counts, most used first; return usage numbers."""
    counts = np.sort(np.asarray(code_counts))[::-1]
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    ax.bar(np.arange(len(counts)), counts, width=1.0)
    ax.set_xlabel("code (sorted by count)")
    ax.set_ylabel("count on held-out images")
    ax.set_title(f"Codebook usage: {int(np.sum(counts > 0))} of {len(counts)} codes used")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    return {"png": path, "codes_used": int(np.sum(counts > 0)), "num_codes": int(len(counts))}


def plot_loss_curves(workdir: str, path: str) -> str:
    """Plot the training losses of the tokenizer, classifier and DiT stages."""
    curves = [("tokenizer", "train/recon_loss"), ("classifier", "train/loss"),
              ("dit", "train/mse")]
    fig = Figure(figsize=(12, 3))
    axes = fig.subplots(1, len(curves))
    for ax, (stage, key) in zip(axes, curves):
        rows = [r for r in metric_writers.read_metrics(os.path.join(workdir, stage)) if key in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows])
            ax.set_yscale("log")
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _relative(workdir: str, path: str) -> str:
    return os.path.relpath(path, workdir)


def _in_stage_dir(workdir: str, stage: str, recorded_path: str) -> str:
    """Return the path of a stage's file inside `workdir`, whatever directory was recorded."""
    return os.path.join(workdir, stage, os.path.basename(recorded_path))


def write_report(config, workdir: str, records: dict) -> dict:
    """Write report.json and report.md in `workdir`; return the report dictionary."""
    tokenizer = records["tokenizer"]["result"]
    evaluation = records["evaluation"]["result"]
    loss_png = plot_loss_curves(workdir, os.path.join(workdir, "loss_curves.png"))
    # Stage results record absolute paths. The files are looked up in this workdir, so the
    # links stay valid when a finished work directory is moved or copied.
    images = {
        "reconstructions": os.path.join(workdir, "tokenizer", "reconstructions.png"),
        "samples": _in_stage_dir(workdir, "samples", records["samples"]["result"]["png"]),
        "loss_curves": loss_png,
        "codebook_usage": _in_stage_dir(workdir, "usage", records["usage"]["result"]["png"]),
    }
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                    "devices": jax.device_count(), "jax_version": jax.__version__},
        "stage_seconds": {name: record["wall_seconds"] for name, record in records.items()},
        "total_seconds": sum(record["wall_seconds"] for record in records.values()),
        "tokenizer": {k: tokenizer[k] for k in ("psnr", "codes_used", "codes_used_fraction",
                                               "perplexity", "step")},
        "classifier_accuracy": records["classifier"]["result"]["accuracy"],
        "sample_accuracy": evaluation["sample_accuracy"],
        "frechet_distance": evaluation["frechet_distance"],
        "per_class_accuracy": evaluation["per_class_accuracy"],
        "num_samples": evaluation["num_samples"],
        "samples_npz": _in_stage_dir(workdir, "samples", records["samples"]["result"]["npz"]),
        "images": {k: _relative(workdir, v) for k, v in images.items()},
        "config": json.loads(config.to_json_best_effort()),
    }
    common.write_json(os.path.join(workdir, "report.json"), report)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "report.md"), "w") as f:
            f.write(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    tok = report["tokenizer"]
    lines = [
        "# vqdiff_jax pipeline report",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpu_count']} CPU "
        f"core(s), JAX {report['machine']['jax_version']} on "
        f"{report['machine']['devices']} {report['machine']['jax_backend']} device(s).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| tokenizer PSNR (held-out, dB) | {tok['psnr']:.2f} |",
        f"| codebook entries used (held-out) | {tok['codes_used']} "
        f"({100 * tok['codes_used_fraction']:.1f} %) |",
        f"| code perplexity | {tok['perplexity']:.1f} |",
        f"| classifier accuracy (held-out) | {100 * report['classifier_accuracy']:.2f} % |",
        f"| sample accuracy ({report['num_samples']} samples) | "
        f"{100 * report['sample_accuracy']:.2f} % |",
        f"| Frechet distance (classifier features) | {report['frechet_distance']:.3f} |",
        "",
        "## Wall time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["stage_seconds"].items()]
    lines += [f"| **total** | {report['total_seconds']:.1f} |", "", "## Per-class sample accuracy",
              "", "| class | accuracy |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f} % |" for k, v in report["per_class_accuracy"].items()]
    lines += ["", "## Images", ""]
    lines += [f"- {name}: [{path}]({path})" for name, path in report["images"].items()]
    lines += ["", f"Samples: `{report['samples_npz']}`", "",
              "The full configuration is in report.json.", ""]
    return "\n".join(lines)


def log_summary(report: dict) -> None:
    tok = report["tokenizer"]
    logging.info(
        "[pipeline] done in %s: tokenizer PSNR %.2f dB, %d codes used (%.0f %%); classifier "
        "accuracy %.2f %%; sample accuracy %.2f %%; Frechet distance %.3f.",
        metric_writers.format_seconds(report["total_seconds"]), tok["psnr"], tok["codes_used"],
        100 * tok["codes_used_fraction"], 100 * report["classifier_accuracy"],
        100 * report["sample_accuracy"], report["frechet_distance"])
