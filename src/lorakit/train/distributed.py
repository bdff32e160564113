"""torchrun / DDP / FSDP plumbing for the training loop; PyTorch's own engines, nothing home-made.

Under ``torchrun --nproc_per_node=N`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) :func:`init_distributed`
starts the process group (nccl on CUDA, gloo on CPU) and :func:`wrap_model` wraps the model in
``DistributedDataParallel`` or, with ``fsdp=True``, shards it with FSDP2's ``fully_shard`` (per-parameter
sharding, so a frozen base and trainable LoRA weights mix freely; the module keeps its own parameter
names). Every rank sees a contiguous slice of each global batch (:func:`shard`); only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``world_size == 1`` means plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed started the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment, pick the device and start the process group if needed.

    ``device=None`` picks ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev, owns)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2 with ``fsdp=True``) around ``model``; the model itself when not distributed.

    FSDP shards every item of the model's ``nn.ModuleList``s (transformer blocks; the direct children when
    there are none), then the root. The returned module is what forward runs through.
    """
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        units = [m for parent in model.modules() if isinstance(parent, nn.ModuleList) for m in parent]
        units = units or list(model.children())
        for unit in reversed(units):  # deepest first
            if any(True for _ in unit.parameters()):
                fully_shard(unit)
        fully_shard(model)
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2 DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard(indices: Sequence[int], info: DistInfo) -> Sequence[int]:
    """This rank's contiguous slice of one global batch (a ragged tail is trimmed to a multiple of the
    world size, so every rank gets the same count)."""
    if not info.enabled:
        return indices
    per = len(indices) // info.world_size
    return indices[info.rank * per:(info.rank + 1) * per]


def mean_across(t: Tensor, info: DistInfo) -> Tensor:
    """All-reduce mean of a scalar tensor (identity when not distributed)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Inside, an FSDP2-sharded ``model`` holds full plain-tensor parameters (gathered on every rank,
    collective) so that ordinary code such as :func:`lorakit.save_adapter` can read them; no-op otherwise.
    Read-only: changes made inside are dropped on exit."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.tensor import DTensor

    _reshard(model)
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                full = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                swapped.append((module, name, p))
                module._parameters[name] = full
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state (the root keeps full parameters after a forward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def trainable_full(model: nn.Module) -> dict[str, Tensor]:
    """Every trainable parameter as a full plain tensor, by ``named_parameters`` name (collective under
    FSDP: call it on every rank)."""
    from torch.distributed.tensor import DTensor

    _reshard(model)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy ``tensors`` (from :func:`trainable_full`) into ``model``'s trainable parameters, exactly."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    wrong = [n for n, p in params.items() if tensors[n].shape != p.shape]  # copy_ would broadcast or fail half-way
    if wrong:
        raise ValueError(f"checkpoint tensor {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model's "
                         f"{tuple(params[wrong[0]].shape)}")
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[n]
            if isinstance(p, DTensor):
                t = distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            p.copy_(t)
