"""Process-group set-up for torchrun, the legacy `torch.distributed.launch`, or one plain process."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(local_rank_arg: int | None = None, device: str = "auto") -> DistInfo:
    """Join the process group that the launcher describes in the environment.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. The legacy launcher sets RANK and
    WORLD_SIZE but passes the local rank as `--local_rank`/`--local-rank`, which
    the caller hands in here. With neither, this is a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average a dict of scalar tensors over ranks in one collective."""
    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.unbind(0)))


def all_gather_object(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _floating_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


@contextmanager
def rank_averaged_buffers(*modules: torch.nn.Module):
    """Within the block, every floating buffer (BN running statistics) holds its mean over ranks.

    Without SyncBatchNorm each rank's BN statistics follow its own data, so ranks hold different
    models. Evaluation and checkpoints see this one averaged model; afterwards each rank gets its
    own statistics back, so evaluating or saving never changes how training continues.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    buffers = [b for m in modules for b in _floating_buffers(m)]
    own = [b.clone() for b in buffers]
    try:
        if buffers:
            flat = torch._utils._flatten_dense_tensors([b.double() for b in buffers])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for b, mean in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers)):
                b.copy_(mean)
        yield
    finally:
        for b, saved in zip(buffers, own):
            b.copy_(saved)
