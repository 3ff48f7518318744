r"""Run a trainer's command line and save each process's final train state.

  python tests/helpers/run_trainer.py MODULE --final_state=PATH -- TRAINER_FLAGS...

MODULE is a trainer module such as `experiments.train_tokenizer`, and the flags
after `--` are its own. When training ends, every process saves its copy of the
final train state to PATH.process<i>.npz, keyed by `trees.path_name`, so a test
can compare the states that different processes hold in memory.
"""

import argparse
import importlib
import os
import sys

import jax
import numpy as np
from absl import app, flags

from vqdiff_jax import trainer

# This file runs as a script, so its sibling module is imported by path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trees


def save_final_state(path: str) -> None:
    run_train_loop = trainer.train_loop

    def train_loop_and_save(*args, **kwargs):
        state = run_train_loop(*args, **kwargs)
        # Every process has a full copy of the replicated state.
        local = trees.flatten(state, to_numpy=lambda leaf: np.asarray(leaf.addressable_data(0)))
        np.savez(f"{path}.process{jax.process_index()}.npz", **local)
        return state

    trainer.train_loop = train_loop_and_save


def main() -> None:
    separator = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("module")
    parser.add_argument("--final_state", required=True)
    args = parser.parse_args(sys.argv[1:separator])

    module = importlib.import_module(args.module)
    save_final_state(args.final_state)

    sys.argv = [args.module, *sys.argv[separator + 1:]]
    module.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(module.main)


if __name__ == "__main__":
    main()
