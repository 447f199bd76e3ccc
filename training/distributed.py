"""Data-parallel training on torch.distributed: one process per device, started by ``torchrun``.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`init` reads them and
joins the process group (NCCL on CUDA, gloo on CPU). Without them (a plain ``hytrec train``) it is a world
of one and nothing here communicates. What each process does (training/train.py):

* Every process loads the data file (the item vocabulary needs every item) and computes the same epoch plan
  from the same seed (the DistributedSampler pattern); of each global batch it builds and trains on its own
  share of the users, ``plan[step][rank::world]`` (lengths sorted, so the shares pad alike).
* DDP averages the gradients; each process's loss is scaled so that the average is the gradient of the
  global batch's mean loss, so a run on N processes follows the curve of one process with the same batch.
* Evaluation is sharded the same way (``predictions[rank::world]``) and the ranks are gathered, so every
  process holds the full metrics (and takes the same early-stopping decision).
* Only rank 0 writes files (checkpoints, logs, the train state, which holds every rank's RNG state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (picklable objects; a list of one without a process group)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64; the same list without a process group)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init(device: str) -> World:
    """Join the process group torchrun described in the environment (or none); the device of this process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device (this torch build or this machine)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=size)
    return World(rank, size, dev)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
