"""Data-parallel training under torchrun (``torchrun --nproc_per_node 2 -m athwe.cli train ...``).

The launcher's RANK, WORLD_SIZE and LOCAL_RANK say which process this is; without them (or with
WORLD_SIZE 1) nothing here does anything and training is the single-process loop. With several
processes, every one holds the whole model and data; each training batch of ``train.batch_size``
samples is split between them (sample i of the batch goes to rank i mod WORLD_SIZE), their
gradients are averaged weighted by how many samples each had, so a step equals the one-process step
on the whole batch for losses that are means over samples (in-batch contrastive terms see only
the local share as negatives); evaluation ranks a share of the users on each process and combines
the ranks, so metrics are exactly those of one process. Rank 0 writes the run folder and prints.
Backends: NCCL on CUDA (process i on cuda:LOCAL_RANK), gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from athwe.errors import AthweError, brief


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The process's place in a torchrun launch, from RANK / WORLD_SIZE / LOCAL_RANK."""
    raw = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if raw["WORLD_SIZE"] in (None, "", "1"):
        return World()
    try:
        size, rank = int(raw["WORLD_SIZE"] or ""), int(raw["RANK"] or "")
        local = int(raw["LOCAL_RANK"]) if raw["LOCAL_RANK"] not in (None, "") else rank
    except ValueError:
        raise AthweError(f"distributed launch: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {raw}") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise AthweError(f"distributed launch: need 0 <= RANK < WORLD_SIZE, got {raw}")
    return World(rank, size, local)


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the launch's process group (once) and pick this process's device: cuda:LOCAL_RANK when
    training on CUDA. Single-process: (World(), device) unchanged."""
    world = world_from_env()
    if not world.active:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise AthweError(f"distributed launch: LOCAL_RANK {world.local_rank} but only "
                             f"{torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=30))
        except (ValueError, RuntimeError) as e:  # e.g. MASTER_ADDR unset: WORLD_SIZE without torchrun
            raise AthweError(f"distributed launch (WORLD_SIZE {world.size}): cannot join the process group "
                             f"({brief(e)}); start it with torchrun") from None
    return world, device


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_gradients(params: Iterable[torch.nn.Parameter], weight: float) -> None:
    """Replace every parameter's gradient by the sum over processes of weight * gradient (weights
    summing to 1: each process's share of the batch). A parameter no process gave a gradient keeps
    none, as in one process (Adam then leaves it alone)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    flat = torch.cat([(p.grad.float() * weight if p.grad is not None
                       else torch.zeros(p.numel(), device=dev)).reshape(-1)
                      for p in params])
    dist.all_reduce(has)
    dist.all_reduce(flat)
    offset = 0
    for p, any_grad in zip(params, has.tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if any_grad else None
        offset += n


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over processes (in place, also returned)."""
    moved = t.to(_device())
    dist.all_reduce(moved)
    if moved is not t:
        t.copy_(moved.to(t.device))
    return t


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()
