"""Process-group set-up for torchrun, the legacy `torch.distributed.launch`, `srun` (one Slurm
task per process), or one plain process."""

from __future__ import annotations

import os
import subprocess
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


# The port a Slurm step's ranks meet on, unless MASTER_PORT is set: derived from the job and
# step ids, so every task computes the same one without talking, and two jobs sharing a node
# rarely collide.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 40000


def slurm_step() -> dict | None:
    """The torch launcher variables that a task of an `srun` step stands for, or None.

    Only inside a job step (SLURM_STEP_ID is set): an sbatch script's own shell also carries
    SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is one process, not a rank of a group.
    Under `srun torchrun …` torchrun's WORLD_SIZE wins (see `init_distributed`).
    """
    env = os.environ
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None
    world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    step = {"WORLD_SIZE": str(world), "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if world > 1:
        step["MASTER_ADDR"] = env.get("MASTER_ADDR") or _slurm_first_node()
        job, step_id = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0"))
        step["MASTER_PORT"] = env.get("MASTER_PORT") or str(SLURM_PORT_BASE + (16 * job + step_id) % SLURM_PORT_SPAN)
    return step


def _slurm_first_node() -> str:
    """The step's first node, where rank 0 runs (Slurm places tasks in node order)."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if nodes:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    # Without scontrol: the node srun was started from (the batch host, the first node).
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR") or os.environ.get("SLURMD_NODENAME", "127.0.0.1")


def launcher_ranks() -> tuple[int, int]:
    """(rank, world size) as the launcher describes them, before any process group exists."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
    step = slurm_step()
    if step is not None:
        return int(step["RANK"]), int(step["WORLD_SIZE"])
    return 0, 1


def init_distributed(local_rank_arg: int | None = None, device: str = "auto") -> DistInfo:
    """Join the process group that the launcher describes in the environment.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. The legacy launcher sets RANK and
    WORLD_SIZE but passes the local rank as `--local_rank`/`--local-rank`, which
    the caller hands in here. `srun python train_semi.py` (one task per GPU, as U2PL's and
    UniMatch's scripts launch) sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID instead: those
    become torch's variables (see `slurm_step`), the address of the step's first node and a
    port from the job id, unless MASTER_ADDR/MASTER_PORT are set. With none, this is a single
    process.
    """
    if "WORLD_SIZE" not in os.environ:
        step = slurm_step()
        if step is not None and int(step["WORLD_SIZE"]) > 1:
            os.environ.update(step)  # what init_process_group's env:// reads, and what the CLI reads
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
