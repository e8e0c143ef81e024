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
import math
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
    device: str = "cpu"  # where the process group's tensors live: the CPU (gloo) or this process's GPU (NCCL)

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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, f"cuda:{local_rank}" if cuda else "cpu")


def gather_rows(tensor: Tensor, world: World, pad: float = 0.0) -> Tensor:
    """Every rank's ``tensor`` ``[n, R, ...]`` stacked along rows in rank order, ``[size * n, R_max, ...]``: the
    second dimension (the response width, which differs between ranks) is padded on the right with ``pad``.
    Every rank must pass the same number of rows."""
    if not world.active:
        return tensor
    width = torch.tensor([tensor.shape[1] if tensor.dim() > 1 else 0], device=tensor.device)
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
    return _reduce_scalar(value, world, dist.ReduceOp.SUM)


def max_scalar(value: float, world: World) -> float:
    return _reduce_scalar(value, world, dist.ReduceOp.MAX)


def _reduce_scalar(value: float, world: World, op: Any) -> float:
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=op)
    return float(t)


def sum_gradients(params: list[Tensor], world: World) -> None:
    """Sum the gradients of ``params`` over ranks, in place, in one flat buffer per dtype. A parameter that has a
    gradient on some rank gets one on every rank (zeros where it had none), so every rank's optimizer steps the
    same parameters; one without a gradient anywhere keeps ``grad = None``, as in a single process."""
    if not world.active:
        return
    params = [p for p in params if not is_sharded(p)]  # FSDP2 reduces its own (reduce-scatter in the backward)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=world.device)
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


# -- FSDP2: sharded weights, gradients and optimizer states (parallel=fsdp) --------------------------------------


def shard(model: torch.nn.Module, bf16: bool = False) -> None:
    """Shard ``model`` over the processes with FSDP2 (``fully_shard``): each block that Hugging Face marks as not
    to be split (``_no_split_modules``: the decoder layers) is one unit, the rest (embeddings, final norm, output
    layer) the root's. Gradients are summed, not averaged, over processes (each process's loss is already scaled
    by its share of the batch). With ``bf16``, forwards compute in bf16 and gradients reduce in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    options = {"mp_policy": MixedPrecisionPolicy(torch.bfloat16, torch.float32)} if bf16 else {}
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum


def is_sharded(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict with every sharded tensor gathered whole, on the CPU (a collective: every process
    calls it)."""
    # tied parameters (one parameter under two names, e.g. embeddings and output layer) stay one tensor
    first: dict[int, str] = {}
    canonical = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(param), name)
    out: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        source = canonical.get(key, key)
        if source != key and source in out:
            out[key] = out[source]
        else:
            out[key] = (value.full_tensor() if is_sharded(value) else value).detach().cpu()
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded states gathered whole (a collective), the layout of an unsharded
    optimizer's: a checkpoint of a sharded run resumes unsharded, and the reverse."""
    saved = optimizer.state_dict()
    state = {
        index: {k: (v.full_tensor() if is_sharded(v) else v) for k, v in values.items()}
        for index, values in saved["state"].items()
    }
    return {**saved, "state": state}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading whole states into an optimizer of sharded parameters: shard each state like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, Tensor) and not is_sharded(value) and value.shape == param.shape:
                    whole = value.to(param.device)
                    optimizer.state[param][key] = distribute_tensor(whole, param.device_mesh, param.placements)


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of ``params``, sharded (a collective) or not, as
    ``torch.nn.utils.clip_grad_norm_`` does; returns the norm before clipping (``inf`` or ``nan`` if a gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = 0.0
    for g in grads:
        n = g.detach().float().norm(2)
        squares += float(n.full_tensor() if is_sharded(n) else n) ** 2
    total = math.sqrt(squares)
    coef = max_norm / (total + 1e-6) if max_norm > 0 else 1.0
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
