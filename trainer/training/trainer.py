"""The Trainer: named training loops, validation and test scoring, scheduling, early stopping, checkpoints.

Reads top to bottom: `fit` runs epochs; each epoch calls the loop named by `train_loop`, scores the validation
stretch and the test split, steps the scheduler, writes a checkpoint and reports the metrics. The Trainer knows
nothing about MLflow: it reports through the small `Reporter` interface.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainer.data.recording import DataBundle, WindowSet
from trainer.errors import UserError
from trainer.training import checkpoint
from trainer.training.metrics import pearson_per_cell


class Reporter(Protocol):
    """Where a run's results go (MLflow in practice, a list in tests)."""

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def checkpoint(self, path: Path, name: str) -> None: ...


class NullReporter:
    """Reports nowhere: for runs without tracking."""

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def checkpoint(self, path: Path, name: str) -> None:
        pass


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: usually a learning rate that is too high."""


@dataclass
class FitResult:
    """What a finished run achieved."""

    epochs_run: int
    best_epoch: int
    best_val_pearson: float
    test_pearson_at_best: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present, else CPU; an explicit device that is missing is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available here; set device to auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps requested but MPS is not available here; set device to auto or cpu")
    return torch.device(name)


def make_loss(cfg: dict[str, Any]) -> nn.Module:
    """The data loss named by `lossfxn`."""
    if cfg["lossfxn"] == "PoissonNLLLoss":
        return nn.PoissonNLLLoss(log_input=cfg["log_poisson"])
    return nn.MSELoss()


def make_scheduler(cfg: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule named by `scheduler`; the plateau schedule watches validation r (max mode)."""
    if cfg["scheduler"] == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg["scheduler_scale"], patience=cfg["scheduler_patience"],
            threshold=cfg["scheduler_thresh"], threshold_mode="abs")
    if cfg["scheduler"] == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg["scheduler_milestones"],
                                                    gamma=cfg["scheduler_scale"])
    return None


class Trainer:
    """Trains one model on one recording with the settings of one resolved run configuration."""

    def __init__(self, model: nn.Module, data: DataBundle, cfg: dict[str, Any], run_dir: Path,
                 device: torch.device, reporter: Reporter | None = None,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None):
        self.model = model.to(device)
        self.data = data
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = device
        self.reporter = reporter or NullReporter()
        self.on_epoch = on_epoch
        self.loss_fn = make_loss(cfg)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["l2"])
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.shuffle_gen = torch.Generator().manual_seed(cfg["seed"])
        # Training loops by name: `train_loop` in the config picks one.
        self.loops: dict[str, Callable[[int], dict[str, float]]] = {"train_loop": self.train_loop}
        if cfg["train_loop"] not in self.loops:
            raise UserError(f"unknown train_loop '{cfg['train_loop']}': available: {', '.join(self.loops)}")

    # ---- one epoch of training ----------------------------------------------------------------------------------
    def train_loop(self, epoch: int) -> dict[str, float]:
        """Plain loop: data loss plus l1 x mean |output|, Adam step per batch; returns the epoch's mean losses."""
        self.model.train()
        total, n = 0.0, 0
        for x, y in self.data.train.batches(self.cfg["batch_size"], shuffle=self.cfg["shuffle"],
                                            generator=self.shuffle_gen):
            out = self.model(x)
            loss = self.batch_loss(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"training loss became {value} in epoch {epoch}; lower lr "
                                       f"(now {self.cfg['lr']:g}) or check the recording")
            total += value * len(y)
            n += len(y)
        return {"train_loss": total / n}

    def batch_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Data loss plus l1 x mean |output|: a mean, so the penalty does not grow with batch_size."""
        loss = self.loss_fn(out, y)
        if self.cfg["l1"] > 0:
            loss = loss + self.cfg["l1"] * out.abs().mean()
        return loss

    # ---- scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, windows: WindowSet) -> torch.Tensor:
        """Model outputs for every sample of `windows`, in batches, in eval mode."""
        self.model.eval()
        batch = max(self.cfg["batch_size"], 1024)
        return torch.cat([self.model(x) for x, _ in windows.batches(batch)])

    def score(self, windows: WindowSet) -> tuple[float, torch.Tensor]:
        """Data loss and per-cell Pearson r of predicted rates against the split's targets."""
        out = self.predict(windows)
        targets = windows.targets.to(out.device)
        loss = self.loss_fn(out, targets).item()
        rates = out.exp() if self.cfg["lossfxn"] == "PoissonNLLLoss" and self.cfg["log_poisson"] else out
        return loss, pearson_per_cell(rates, targets)

    # ---- the run ---------------------------------------------------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None = None) -> FitResult:
        """Train for n_epochs (or until early stopping), starting after the checkpoint `resume` if given."""
        history: list[dict[str, float]] = []
        best_epoch, best_r, best_test = 0, -math.inf, math.nan
        start = 1
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            if self.scheduler is not None and resume.get("scheduler") is not None:
                self.scheduler.load_state_dict(resume["scheduler"])
            self.shuffle_gen.set_state(resume["shuffle_rng"])
            torch.set_rng_state(resume["torch_rng"])
            history = list(resume["history"])
            best_epoch, best_r, best_test = resume["best_epoch"], resume["best_val_pearson"], resume["best_test"]
            start = resume["epoch"] + 1

        patience = self.cfg["early_stopping"]
        stopped_early = False
        epoch = start - 1
        for epoch in range(start, self.cfg["n_epochs"] + 1):
            t0 = time.perf_counter()
            metrics = self.loops[self.cfg["train_loop"]](epoch)
            train_seconds = time.perf_counter() - t0
            val_loss, val_r = self.score(self.data.val)
            test_loss, test_r = self.score(self.data.test)
            metrics.update(val_loss=val_loss, val_pearson=val_r.mean().item(), test_loss=test_loss,
                           test_pearson=test_r.mean().item(), lr=self.optimizer.param_groups[0]["lr"])
            for cid, v, t in zip(self.data.cell_ids, val_r.tolist(), test_r.tolist()):
                metrics[f"val_pearson_cell{cid}"] = v
                metrics[f"test_pearson_cell{cid}"] = t
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(metrics["val_pearson"])
            elif self.scheduler is not None:
                self.scheduler.step()
            metrics["epoch_seconds"] = time.perf_counter() - t0
            metrics["samples_per_s"] = len(self.data.train) / train_seconds
            history.append({"epoch": epoch, **metrics})

            improved = metrics["val_pearson"] > best_r
            if improved:
                best_epoch, best_r, best_test = epoch, metrics["val_pearson"], metrics["test_pearson"]
            self._checkpoint(epoch, metrics, history, best_epoch, best_r, best_test, improved)
            self.reporter.epoch(epoch, metrics)
            if self.on_epoch is not None:
                self.on_epoch(epoch, metrics)
            if patience and epoch - best_epoch >= patience:
                stopped_early = epoch < self.cfg["n_epochs"]
                break
        return FitResult(epochs_run=epoch, best_epoch=best_epoch, best_val_pearson=best_r,
                         test_pearson_at_best=best_test, stopped_early=stopped_early, history=history)

    def _checkpoint(self, epoch: int, metrics: dict[str, float], history: list[dict[str, float]],
                    best_epoch: int, best_r: float, best_test: float, improved: bool) -> None:
        """Write this epoch's checkpoint (and best.pt when it improved); keep older epochs only if asked."""
        state = {
            "epoch": epoch, "metrics": metrics, "history": history,
            "best_epoch": best_epoch, "best_val_pearson": best_r, "best_test": best_test,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "torch_rng": torch.get_rng_state(), "shuffle_rng": self.shuffle_gen.get_state(),
            "config": self.cfg, "norm": self.data.norm_stats(), "cell_ids": list(self.data.cell_ids),
            "n_cells": self.data.n_cells, "model_type": self.cfg["model_type"],
        }
        path = checkpoint.save(state, self.run_dir / checkpoint.epoch_file(epoch))
        if not self.cfg["save_every_epoch"]:
            for old in self.run_dir.glob("epoch_*.pt"):
                if old != path:
                    old.unlink()
        self.reporter.checkpoint(path, checkpoint.LATEST)
        if self.cfg["save_every_epoch"]:
            self.reporter.checkpoint(path, path.name)
        if improved:
            best = checkpoint.save(state, self.run_dir / checkpoint.BEST)
            self.reporter.checkpoint(best, checkpoint.BEST)
