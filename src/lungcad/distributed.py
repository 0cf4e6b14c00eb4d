"""torch.distributed plumbing: one process per device under torchrun, or a plain single process.

`torchrun --nproc-per-node N -m lungcad train ...` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous variables); we only read them. Backend: nccl on GPUs, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lungcad.errors import LungcadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this process's GPU if there is one, else CPU; `cpu`; `cuda` / `cuda:i`."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LungcadError(f"--device {spec}: no CUDA device is available (use --device cpu)")
        index = int(spec.split(":", 1)[1]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise LungcadError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if spec != "cpu":
        raise LungcadError(f"unknown --device {spec!r} (auto, cpu, cuda or cuda:N)")
    return torch.device("cpu")


def init_distributed(device_spec: str = "auto", timeout_s: int = 600) -> DistContext:
    """Join the process group when launched by torchrun; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The timeout bounds how long survivors wait for a dead peer before failing cleanly.
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined (%s, %s)", rank, world, backend, device)
    return DistContext(rank, world, local_rank, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a few scalars over ranks (loss sums, counts)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum_tensor(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor; the input is left alone)."""
    if not ctx.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def broadcast_from_main(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's Python object on every rank; a LungcadError raised on rank 0 is re-raised everywhere."""
    if not ctx.distributed:
        if isinstance(obj, LungcadError):
            raise obj
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], LungcadError):
        raise box[0]
    return box[0]
