"""Multi-process training with torch.distributed (``torchrun --nproc_per_node=N -m kdlib train ...``).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the engine reads them here. Every rank
runs the same epochs on its shard of each global batch, gradients are averaged by
DistributedDataParallel, metrics are summed across ranks, and only rank 0 writes checkpoints and
records. The backend is NCCL on GPUs and gloo on CPUs (what CI tests).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kdlib import KDLibError


def world() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def device_for_rank(device: torch.device) -> torch.device:
    """On CUDA each rank takes the GPU of its ``LOCAL_RANK``."""
    if device.type == "cuda" and world()[1] > 1 and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def setup(device: torch.device) -> bool:
    """Join the process group when launched by torchrun; returns True when distributed."""
    _, size = world()
    if size <= 1:
        return False
    if not dist.is_available():
        raise KDLibError("this torch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics differ per shard otherwise)."""
    if dist.is_available() and dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, src=0)
