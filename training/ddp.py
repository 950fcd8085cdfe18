"""DistributedDataParallel plumbing for the training loop: process group, device, reductions.

The loop runs single-process unless it was launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` set) or the caller already initialised a process group. Everything here is a no-op
in a single process, so the loop has one code path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from inference.device import parse_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job and which device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """True when :func:`setup` created the process group (and :func:`teardown` must destroy it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs epoch summaries and shows progress."""
        return self.rank == 0


def launched_as_worker() -> bool:
    """True in a torchrun process other than rank 0: it trains, but writes no model folder."""
    return _env_int("RANK", 0) != 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from exc


def resolve_device(device: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; under DDP ``cuda`` means this process's ``LOCAL_RANK`` GPU."""
    parsed = parse_device(device)
    if not parsed.is_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if parsed.index is None and distributed:
        return torch.device("cuda", local_rank)
    return torch.device(str(parsed))


def setup(device: str) -> DistContext:
    """Join (or create) the process group if this is a distributed launch; pick the device.

    gloo on CPU, nccl on CUDA. ``init_process_group`` reads ``MASTER_ADDR``/``MASTER_PORT`` from
    the environment, which torchrun sets.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        owns = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return DistContext(device=resolve_device(device))
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_RANK", rank)
        owns = True
    dev = resolve_device(device, local, distributed=world > 1)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        logger.info("joined process group: rank %d of %d (%s, %s)", rank, world, backend, dev)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, owns_group=owns)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; identity in a single process)."""
    if not ctx.enabled:
        return values
    # nccl reduces on the GPU; gloo on the CPU.
    reduced = values.to(ctx.device).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def all_gather(ctx: DistContext, obj: Any) -> list[Any]:
    """Gather a picklable object from every rank, in rank order."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step the
    ranks' running statistics differ by one update. Validation on every rank must use the same
    statistics as the checkpoint rank 0 writes.
    """
    if not ctx.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def barrier(ctx: DistContext) -> None:
    if not ctx.enabled:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index or 0])  # nccl needs to know the GPU
    else:
        dist.barrier()
