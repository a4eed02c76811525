"""What training and evaluation both set up: seeding, the autocast dtype, the run's environment record."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from s4mc import REPO_ROOT, __version__
from s4mc.config import dump_config
from s4mc.distributed import DistInfo


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    # Ranks get different streams (dropout, augmentation) but each follows the run seed.
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_info(run_dir: Path, cfg: dict, dist: DistInfo, argv: list[str]) -> None:
    dump_config(cfg, run_dir / "config.yaml")
    info = {
        "s4mc_version": __version__,
        "git_commit": git_commit(),
        "argv": argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
        "world_size": dist.world_size,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    update_environment(run_dir, info)


def update_environment(run_dir: str | Path, fields: dict) -> None:
    """Merge `fields` into the run's environment.json (the one writer of that file): the versions
    at the start of a run, the protocol facts once the run header is known."""
    path = Path(run_dir) / "environment.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields)
    path.write_text(json.dumps(info, indent=2))
