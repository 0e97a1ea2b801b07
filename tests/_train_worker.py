"""Worker for the torchrun tests of tests/test_train_*.py: ``_train_worker.py SCRIPT OUT_DIR ARGS...`` runs
``SCRIPT.main(ARGS)`` and, at every checkpoint, first dumps this rank's model state (parameters and buffers) and
optimizer state to ``OUT_DIR/rank{r}_step{s}.pt``."""
import importlib
import os
import sys

import torch

from nano4d.checkpoint import unwrap

script, out = sys.argv[1], sys.argv[2]
mod = importlib.import_module(script)
real = mod.save_checkpoint


def save_checkpoint(run_dir, model, config, optimizer=None, step=0, **kw):
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()["state"] if optimizer else {}}
    torch.save(state, os.path.join(out, f"rank{os.environ['RANK']}_step{step}.pt"))
    return real(run_dir, model, config, optimizer, step, **kw)


mod.save_checkpoint = save_checkpoint
mod.main(sys.argv[3:])
