r"""Sample images per class from a trained DiT (EMA weights) and save them.

  python -m experiments.sample_dit --workdir=workdirs/dit --output_dir=workdirs/samples

Writes `samples.npz` (`images` uint8 [N, H, W, C], `labels` int32 [N], the
class asked for) and `samples.png` (one row per class) into --output_dir.
Sampling settings come from the DiT run's config and can be overridden with the
flags below.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common, train_dit
from vqdiff_jax import images as images_lib
from vqdiff_jax import latent_diffusion


def sample_to_dir(dit_workdir: str, output_dir: str, *, overrides: dict | None = None) -> dict:
    """Generate `per_class` images of every class; write samples.npz and samples.png.

    `overrides` replaces fields of the run's `sample` config block. Returns
    {'npz': path, 'png': path, 'num_images': N, 'seconds': wall time}.
    """
    import time

    run = train_dit.load_dit(dit_workdir)
    sample_config = run["config"].sample.copy_and_resolve_references()
    for key, value in (overrides or {}).items():
        if value is not None:
            sample_config[key] = value
    latent_diffusion.check_sampling_args(
        guidance_scale=sample_config.guidance_scale, num_steps=sample_config.num_steps,
        num_timesteps=run["config"].diffusion.num_timesteps, sampler=sample_config.sampler,
        per_class=sample_config.per_class)
    labels = np.repeat(np.arange(run["num_classes"]), sample_config.per_class).astype(np.int32)
    tok_model, tok_state, _ = run["tokenizer"]

    start = time.perf_counter()
    images = train_dit.generate(
        run["model"], run["state"].ema_params, run["schedule"], run["stats"], tok_model,
        tok_state, labels, sample_config,
        prediction_type=run["config"].diffusion.prediction_type,
        latent_shape=run["latent_shape"], key=jax.random.key(sample_config.seed),
        num_timesteps=run["config"].diffusion.num_timesteps)
    seconds = time.perf_counter() - start

    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    uint8 = images_lib.to_uint8(images)
    npz_path = os.path.join(output_dir, "samples.npz")
    tmp = npz_path + ".tmp.npz"
    np.savez(tmp, images=uint8, labels=labels)
    os.replace(tmp, npz_path)
    grid_columns = min(sample_config.per_class, 10)
    grid = np.concatenate([uint8[labels == c][:grid_columns] for c in range(run["num_classes"])])
    png_path = images_lib.save_grid(os.path.join(output_dir, "samples.png"), grid,
                                    num_columns=grid_columns, scale=2)
    logging.info("[sample] %d images in %.1f s -> %s", len(labels), seconds, npz_path)
    common.write_json(os.path.join(output_dir, "sample_config.json"), sample_config.to_dict())
    return {"npz": npz_path, "png": png_path, "num_images": int(len(labels)), "seconds": seconds}


def main(argv):
    del argv
    common.configure_logging()
    jnp.zeros(())
    sample_to_dir(flags.FLAGS.workdir, flags.FLAGS.output_dir, overrides={
        "per_class": flags.FLAGS.per_class, "guidance_scale": flags.FLAGS.guidance_scale,
        "num_steps": flags.FLAGS.num_steps, "sampler": flags.FLAGS.sampler, "seed": flags.FLAGS.seed})


def define_flags() -> None:
    """Define the command-line flags; called only when the module runs as a script."""
    flags.DEFINE_string("workdir", None, "Work directory of experiments.train_dit.")
    flags.DEFINE_string("output_dir", None, "Where samples.npz and samples.png go.")
    flags.DEFINE_integer("per_class", None, "Images per class; the config value if unset.")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale.")
    flags.DEFINE_integer("num_steps", None, "Sampling steps.")
    flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Sampler.")
    flags.DEFINE_integer("seed", None, "Sampling seed.")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir", "output_dir"])
    app.run(main)
