"""The MNIST-1D demo under FSDP2 (``fully_shard``): one process per rank, started by torchrun.

Run it with::

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/train_fsdp.py

The recipe of ``scripts/train_ddp.py`` (the same data, policy, options and output), with the
demo's CNN sharded instead of replicated: each convolution block and the classifier are
``fully_shard``-ed, then the whole model, so every rank holds a slice of each parameter, of its
gradient and of the optimizer's momentum (gloo on the CPU, NCCL when CUDA is available). The
loop hands the model to the scheduler:

* ``scheduler.train_step(batch, loss_fn, model=model)`` gathers the parameters once per step,
  runs the micro-batches with FSDP's gradient synchronisation off, agrees over the ranks on any
  out-of-memory error, and lets FSDP reduce-scatter the gradients in the last backward pass;
  the optimizer then steps each rank's slice.

BatchNorm statistics stay per rank (each normalises its own share of the batch, at least 16
samples: the BatchNorm floor) and, unlike DDP, FSDP does not broadcast rank 0's running
statistics: each rank evaluates its own model (a forward pass gathers parameters, so all ranks
run it) and rank 0 reports its accuracy. Only rank 0 writes TensorBoard files and prints.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from adabatch.demo import shard_model
from train_ddp import Launcher, Wrapped, main

LAUNCH = "python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/train_fsdp.py"


def wrap_fsdp(model: nn.Module, device: torch.device) -> Wrapped:
    """Each convolution block and the classifier sharded, then the whole model (``shard_model``)."""
    shard_model(model)
    return Wrapped(model, {"model": model}, collective_forward=True)


FSDP = Launcher(wrap_fsdp, LAUNCH, __doc__.split("\n")[0], "fsdp",
                "fully sharded   {world_size} processes ({backend}, {threads} thread(s) each), each holding "
                "1/{world_size} of every parameter and training 1/{world_size} of every batch")

if __name__ == "__main__":
    sys.exit(main(launcher=FSDP))
