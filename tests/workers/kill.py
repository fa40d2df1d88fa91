"""A callback for the checkpoint-safety test: the process dies (os._exit) right after the Nth file a
checkpoint save writes with torch.save, as a node failure in the middle of a save would leave it."""

import os

import torch
from lightning.pytorch.callbacks import Callback


class DieWhileSaving(Callback):
    def __init__(self, after_files: int):
        self.after_files = after_files

    def setup(self, trainer, pl_module, stage):
        save, written = torch.save, []

        def save_then_maybe_die(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            written.append(f)
            if len(written) == self.after_files:
                os._exit(17)

        torch.save = save_then_maybe_die
