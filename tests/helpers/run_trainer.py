r"""Run a trainer's command line with test instrumentation.

  python tests/helpers/run_trainer.py MODULE [--unshuffled] [--first_batch=PATH] \
      [--final_state=PATH] -- TRAINER_FLAGS...

MODULE is `experiments.train_tokenizer` or `experiments.train_dit`, and the
flags after `--` are the trainer's own. Options:

  --unshuffled   read training examples in stored order. DiT batches then also
                 carry `index`, the positions of their examples in the latents.
  --first_batch  save the first training batch of the run and its start step to
                 PATH (npz), then exit with status 0 before the first train step.
  --final_state  save this process's copy of the final train state to
                 PATH.process<i>.npz, keyed by `trees.path_name`.
"""

import argparse
import importlib
import os
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trees  # noqa: E402  (a sibling module; this file runs as a script)

from experiments import common  # noqa: E402
from vqdiff_jax import latent_diffusion, trainer  # noqa: E402


def use_unshuffled_data() -> None:
    load_train_iterator = common.pipeline.get_train_iterator

    def unshuffled_iterator(**kwargs):
        return load_train_iterator(**{**kwargs, "shuffle": False})

    common.pipeline.get_train_iterator = unshuffled_iterator

    class UnshuffledLatentBatches(latent_diffusion.LatentBatches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "shuffle": False})

        def __next__(self):
            index = self.indices(self.step)
            return {**super().__next__(), "index": index}

    latent_diffusion.LatentBatches = UnshuffledLatentBatches


def stop_after_first_batch(path: str) -> None:
    def save_first_batch(loop, state, train_step, batches, **kwargs):
        del loop, train_step, kwargs
        batch = next(batches)
        arrays = {name: np.asarray(value) for name, value in batch.items()}
        np.savez(path, start_step=np.asarray(jax.device_get(state.step)), **arrays)
        raise SystemExit(0)

    trainer.train_loop = save_first_batch


def save_final_state(path: str) -> None:
    run_train_loop = trainer.train_loop

    def train_loop_and_save(*args, **kwargs):
        state = run_train_loop(*args, **kwargs)
        # Every process holds a full copy of the replicated state.
        local = trees.flatten(state, to_numpy=lambda leaf: np.asarray(leaf.addressable_data(0)))
        np.savez(f"{path}.process{jax.process_index()}.npz", **local)
        return state

    trainer.train_loop = train_loop_and_save


def main() -> None:
    separator = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("module")
    parser.add_argument("--unshuffled", action="store_true")
    parser.add_argument("--first_batch")
    parser.add_argument("--final_state")
    args = parser.parse_args(sys.argv[1:separator])

    module = importlib.import_module(args.module)
    if args.unshuffled:
        use_unshuffled_data()
    if args.first_batch:
        stop_after_first_batch(args.first_batch)
    if args.final_state:
        save_final_state(args.final_state)

    sys.argv = [args.module, *sys.argv[separator + 1:]]
    module.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(module.main)


if __name__ == "__main__":
    main()
