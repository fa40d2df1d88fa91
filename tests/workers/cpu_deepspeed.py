"""carevl's DeepSpeed strategy (`carevl.strategies.DeepSpeed`, Lightning's with universal-checkpoint
resumes) with its three CUDA-only checks skipped, so that its whole loop (engine set-up, ZeRO-3
model building, steps, checkpoint saving and restoring) runs in tests on DeepSpeed's CPU
accelerator (DS_ACCELERATOR=cpu, gloo). Everything else is Lightning's and carevl's own code.

What is skipped: the refusal of any accelerator but CUDA, the check that device indices match the
local ranks (CPU devices have none), and the device index DeepSpeed's engine reads (cpu:0 here)."""

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from carevl.strategies import DeepSpeed


class CPUDeepSpeed(DeepSpeed):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own raises without CUDA

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)
