"""carevl's FSDP strategy on CPU processes (gloo), for tests: torch's FullyShardedDataParallel
refuses to pick CPU as its compute device when it is given none, and Lightning gives it none on
CPU. Here it is given the CPU explicitly while the model is wrapped; the rest (sharding, the
training loop, sharded checkpoints) is Lightning's and torch's own code."""

import contextlib

import torch
from torch.distributed.fsdp import fully_sharded_data_parallel

from carevl.strategies import FSDP


@contextlib.contextmanager
def _cpu_compute_device():
    choose = fully_sharded_data_parallel._init_device_handle

    def on_cpu(state, module, ignored_params, device_id):
        return choose(state, module, ignored_params, torch.device("cpu") if device_id is None else device_id)

    fully_sharded_data_parallel._init_device_handle = on_cpu
    try:
        yield
    finally:
        fully_sharded_data_parallel._init_device_handle = choose


class CPUFSDP(FSDP):
    def _setup_model(self, model):
        with _cpu_compute_device():
            return super()._setup_model(model)
