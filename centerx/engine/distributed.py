"""torchrun / DistributedDataParallel helpers: gloo on CPU, NCCL on GPU; rank 0 writes."""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

# How long a collective waits for a rank that neither takes part nor dies (a dead rank is seen
# at once: its connections close). Longer than any rank-0-only work between collectives.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), known before joining."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> bool:
    """Join the process group when launched by torchrun; returns whether distributed."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank (a decision all ranks must take together)."""
    if not is_distributed():
        return flag
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def progress_bars(enabled: bool) -> bool:
    """Bars only where someone watches them: on rank 0, when stderr is a terminal (a log file
    would fill with their redraws)."""
    return bool(enabled) and is_main() and sys.stderr.isatty()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP keeps parameters
    equal, but each rank updates its running statistics with its own batches."""
    if not is_distributed():
        return
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_lists(items: list) -> list:
    """Concatenate each rank's list on every rank."""
    if not is_distributed():
        return items
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
