"""Data parallelism over ``torch.distributed``: ``torchrun --nproc_per_node N -m dfpo train ...``.

Every process (rank) holds the whole model and the same random stream. A step draws the same global prompts on
every rank; each rank samples and scores its contiguous share of them; the per-token tensors the advantages need
(rewards, values or return samples, masks, log-probs) are gathered so that every statistic over groups or over
the batch (GRPO groups, REINFORCE++ and advantage whitening, explained variance) is the one a single process would
compute on the global batch; each rank then takes its own rows back, runs its share of every minibatch, and the
gradients are summed over ranks before clipping (each rank's loss is already scaled by its share of the global
minibatch's tokens or sequences), so every rank takes the same optimizer step and the weights stay identical.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) everything here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that evaluates and writes the run's files."""
        return self.rank == 0

    def shard(self, n: int, what: str = "rollout.prompts") -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` items; ``n`` must split evenly."""
        if n % self.size:
            raise ValueError(
                f"{what}={n} does not split evenly over {self.size} processes: make it a multiple of {self.size}"
            )
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per


def setup(timeout_minutes: float = 30.0) -> World:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL on GPUs), once per
    process; a single process (no ``WORLD_SIZE``, or 1) gets ``World()`` and no process group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_rows(tensor: Tensor, world: World, pad: float = 0.0) -> Tensor:
    """Every rank's ``tensor`` ``[n, R, ...]`` stacked along rows in rank order, ``[size * n, R_max, ...]``: the
    second dimension (the response width, which differs between ranks) is padded on the right with ``pad``.
    Every rank must pass the same number of rows."""
    if not world.active:
        return tensor
    width = torch.tensor([tensor.shape[1] if tensor.dim() > 1 else 0])
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    if tensor.dim() > 1 and tensor.shape[1] < int(width):
        shape = (tensor.shape[0], int(width) - tensor.shape[1], *tensor.shape[2:])
        tensor = torch.cat([tensor, tensor.new_full(shape, pad)], dim=1)
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not world.active:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def sum_scalar(value: float, world: World) -> float:
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def sum_gradients(params: list[Tensor], world: World) -> None:
    """Sum the gradients of ``params`` over ranks, in place, in one flat buffer per dtype. A parameter that has a
    gradient on some rank gets one on every rank (zeros where it had none), so every rank's optimizer steps the
    same parameters; one without a gradient anywhere keeps ``grad = None``, as in a single process."""
    if not world.active or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    chosen = []
    for p, flag in zip(params, has.tolist(), strict=True):
        if flag:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            chosen.append(p)
    for dtype in sorted({p.grad.dtype for p in chosen}, key=str):
        grads = [p.grad for p in chosen if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(modules: list[torch.nn.Module], world: World) -> None:
    """Rank 0's parameters and buffers on every rank (they start equal by seeding; this makes sure of it)."""
    if not world.active:
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def mean_metrics(metrics: dict[str, float], world: World) -> dict[str, float]:
    """Each metric averaged over the ranks that report it."""
    if not world.active:
        return metrics
    merged: dict[str, list[float]] = {}
    for record in gather_objects(metrics, world):
        for key, value in record.items():
            merged.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in merged.items()}


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
