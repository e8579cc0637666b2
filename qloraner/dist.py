"""torch.distributed under torchrun (NCCL on GPUs, gloo on CPU); a no-op in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as td


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); joins the process group when torchrun started us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1 and not td.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        td.init_process_group("nccl" if cuda else "gloo")
    return (td.get_rank() if world > 1 else 0), world, device


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def barrier() -> None:
    if active():
        td.barrier()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place), returned for chaining."""
    if active():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def smallest(value: int, device: torch.device) -> int:
    """The smallest of the ranks' values (every rank must split its steps alike); the value in a single process."""
    if not active():
        return value
    tensor = torch.tensor(value, device=device)
    td.all_reduce(tensor, op=td.ReduceOp.MIN)
    return int(tensor)


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values on every rank (in place), returned for chaining."""
    if active():
        td.broadcast(tensor, src=0)
    return tensor


def gather(obj: object) -> list[object] | None:
    """Every rank's object, on rank 0 (None elsewhere); [obj] in a single process."""
    if not active():
        return [obj]
    out = [None] * td.get_world_size() if td.get_rank() == 0 else None
    td.gather_object(obj, out, dst=0)
    return out


def shutdown() -> None:
    if active():
        td.destroy_process_group()
