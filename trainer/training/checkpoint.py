"""Checkpoints: one file per epoch (every epoch kept, or only the latest) plus the best epoch.

A checkpoint holds everything needed to resume or to use the model: model, optimizer and scheduler state, the
epoch, its metrics and the history so far, the stimulus normalisation, the cells and the resolved config.
Files are written to a temporary name and renamed, so a crash never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# 2: retina-trainer 0.2 (the original's batch-norm eps and output layers); checkpoints without the key are 1.
FORMAT = 2
BEST = "best.pt"
LATEST = "latest.pt"  # the name the newest epoch is reported under, so a resume can find it


def epoch_file(epoch: int) -> str:
    """File name of an epoch's checkpoint."""
    return f"epoch_{epoch:04d}.pt"


def save(state: dict[str, Any], path: Path) -> Path:
    """Write `state` atomically to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save` (weights only: no arbitrary code is unpickled)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def latest(run_dir: Path) -> Path | None:
    """The newest epoch checkpoint in a run folder, or None."""
    files = sorted(run_dir.glob("epoch_*.pt"))
    return files[-1] if files else None
