"""The Trainer: named training loops, validation and test scoring, scheduling, early stopping, checkpoints.

Reads top to bottom: `fit` runs epochs; each epoch calls the loop named by `train_loop`, scores the validation
stretch and the test split, steps the scheduler, writes a checkpoint and reports the metrics. With `prune` the
normal epochs are followed by a pruning phase (trainer/training/pruning.py) of more such epochs. The Trainer knows
nothing about MLflow: it reports through the small `Reporter` interface.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainer.data.windows import DataBundle, WindowSet
from trainer.errors import ConfigError, UserError
from trainer.training import checkpoint
from trainer.training.losses import semantic_loss
from trainer.training.metrics import pearson_per_cell
from trainer.training.pruning import build_pruner, prunable_layers

PRUNING_REPORT = "pruning.json"  # written to the run folder when pruning ends, reported like a checkpoint
SCORE_BATCH = 256  # most samples scored at once: below a training step's peak memory at the default batch_size


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
    pruned_epoch: int = 0  # the epoch after which `stop_check` (an adaptive search's pruner) ended the run, or 0


def exp_at_eval(cfg: dict[str, Any]) -> bool:
    """Whether the evaluated model ends in the original's exp (softplus off; not LN, which ends in ELU, nor
    RetinotopicModel, which always ends in softplus)."""
    return not cfg["softplus"] and cfg["model_type"] not in ("LN", "RetinotopicModel")


def as_rates(cfg: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
    """Evaluated model outputs as firing rates: exp of outputs that are log rates (PoissonNLLLoss with log_poisson),
    unless the model already ends in the original's exp at evaluation (softplus off)."""
    log_rates = cfg["lossfxn"] == "PoissonNLLLoss" and cfg["log_poisson"]
    return out.exp() if log_rates and not exp_at_eval(cfg) else out


def has_onehot_readout(model: nn.Module) -> bool:
    """Whether the model has the one-hot read-out (probability maps and weights) that retinotopic_loop trains."""
    return all(callable(getattr(model, name, None)) for name in ("onehot_probs", "onehot_weights"))


def full_precision(out: torch.Tensor) -> torch.Tensor:
    """Model outputs for losses and metrics: half-precision outputs of autocast raised to float32, float32 and
    float64 kept as they are (a float64 model, as the cross-machine tests use, keeps its precision)."""
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def check_trainable(model: nn.Module, cfg: dict[str, Any]) -> None:
    """The checks of a run's settings against its built model, made before any run starts (preflight) and again
    when its Trainer is built: the loop needs a one-hot read-out, the pruned layers exist."""
    if cfg["train_loop"] == "retinotopic_loop" and not has_onehot_readout(model):
        raise ConfigError(f"train_loop retinotopic_loop needs a model with a one-hot read-out "
                          f"(RetinotopicModel); model_type is {cfg['model_type']}: change model_type or "
                          "set train_loop to train_loop")
    if cfg["prune"]:
        prunable_layers(model, cfg)


def score_batch(cfg: dict[str, Any]) -> int:
    """Samples per scoring batch: batch_size, at most SCORE_BATCH (a forward pass gains nothing from more, and
    scoring then never raises the peak memory of training)."""
    return min(cfg["batch_size"], SCORE_BATCH)


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


class OriginalSchedule:
    """The original's learning-rate schedule as training.py built and stepped it at one commit
    (`scheduler_original`), its bugs kept: torch's own scheduler, stepped once per epoch with what that commit
    passed (`watch`: a metric of the epoch; for MultiStepLR a value passed as its epoch, which torch turns into
    lr x gamma^(milestones <= value)), or with nothing."""

    def __init__(self, cfg: dict[str, Any], optimizer: torch.optim.Optimizer):
        era, retinotopic = cfg["scheduler_original"], cfg["train_loop"] == "retinotopic_loop"
        self.watch: str | None
        if cfg["scheduler"] == "ReduceLROnPlateau" or era == "003f581":
            # get_optim_objs: 'min' mode whatever it watched; 5c2af72 and 003f581 fixed the factor at 0.1
            factor = cfg["scheduler_scale"] if era == "507decb" else 0.1
            patience, thresh = ((10, 1e-4) if era == "003f581"  # torch's defaults: that commit passed neither
                                else (cfg["scheduler_patience"], cfg["scheduler_thresh"]))
            self.torch: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=factor, patience=patience, threshold=thresh, threshold_mode="rel")
            self.watch = {"003f581": "val_loss", "507decb": "val_pearson"}.get(
                era, "train_loss" if retinotopic else "val_pearson")  # 5c2af72's retinotopic_loop: avg_loss
        else:  # MultiStepLR(milestones, gamma=0.1)
            self.torch = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg["scheduler_milestones"],
                                                              gamma=0.1)
            # 507decb's train_loop: scheduler.step(val_acc); 5c2af72's retinotopic_loop: step(avg_loss)
            self.watch = {("507decb", False): "val_pearson", ("5c2af72", True): "train_loss"}.get(
                (era, retinotopic))

    def step(self, metrics: dict[str, float]) -> None:
        if self.watch is None:
            self.torch.step()
            return
        with warnings.catch_warnings():  # torch's deprecation of step(epoch): what the original called
            warnings.simplefilter("ignore", UserWarning)
            self.torch.step(float(metrics[self.watch]))

    def state_dict(self) -> dict[str, Any]:
        return self.torch.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch.load_state_dict(state)


def make_scheduler(cfg: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule named by `scheduler`, with the original's settings (training.py:
    get_optim_objs): the plateau schedule watches validation r with a relative threshold, in max mode (the
    original's min mode on a correlation decayed the rate while r improved: a bug); MultiStepLR steps once per
    epoch (the original passed a metric as the epoch in one version: a bug). `scheduler_original` names a commit whose
    schedule is reproduced instead (OriginalSchedule)."""
    if cfg["scheduler"] == "none":
        return None
    if cfg["scheduler_original"] != "none":
        return OriginalSchedule(cfg, optimizer)
    if cfg["scheduler"] == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg["scheduler_scale"], patience=cfg["scheduler_patience"],
            threshold=cfg["scheduler_thresh"], threshold_mode="rel")
    if cfg["scheduler"] == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg["scheduler_milestones"],
                                                    gamma=cfg["scheduler_gamma"])
    return None


def l1_penalty(cfg: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
    """l1 x |outputs| of one batch (..., batch, units): summed over batch and units as the original
    (training.py: `l1 * torch.norm(y, 1)`), or averaged with l1_per_sample; 0 when l1 is 0."""
    if cfg["l1"] <= 0:
        return out.new_zeros(out.shape[:-2])
    size = out.abs()
    return cfg["l1"] * (size.mean(dim=(-2, -1)) if cfg["l1_per_sample"] else size.sum(dim=(-2, -1)))


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow TensorFloat-32 in CUDA matmuls and convolutions while training, restoring the global flags after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Trainer:
    """Trains one model on one recording with the settings of one resolved run configuration."""

    def __init__(self, model: nn.Module, data: DataBundle, cfg: dict[str, Any], run_dir: Path,
                 device: torch.device, reporter: Reporter | None = None,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                 stop_check: Callable[[int, dict[str, float]], bool] | None = None):
        self.model = model.to(device)
        self.data = data
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = device
        self.reporter = reporter or NullReporter()
        self.on_epoch = on_epoch
        # After each normal epoch (checkpointed and reported): True ends the run there (an adaptive search's pruner)
        self.stop_check = stop_check
        self.loss_fn = make_loss(cfg)
        # The module that computes outputs: compiled when asked; self.model keeps the parameters and state_dict.
        self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(self.model) if cfg["compile"] \
            else self.model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["l2"])
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.shuffle_gen = torch.Generator().manual_seed(cfg["seed"])
        # Training loops by name: `train_loop` in the config picks one.
        self.loops: dict[str, Callable[[int], dict[str, float]]] = {
            "train_loop": self.train_loop, "retinotopic_loop": self.retinotopic_loop}
        if cfg["train_loop"] not in self.loops:
            raise UserError(f"unknown train_loop '{cfg['train_loop']}': available: {', '.join(self.loops)}")
        check_trainable(model, cfg)
        # A model fitted in closed form (RevCorLN) is fitted in one epoch instead of trained for n_epochs.
        self.fitted = bool(getattr(model, "fitted_by_revcor", False))
        self.n_epochs = 1 if self.fitted else cfg["n_epochs"]
        # Pruning after the normal epochs; None when prune is false. Checked here, not when the phase begins.
        self.pruner = build_pruner(self.model, self.optimizer, self.scheduler, cfg) if cfg["prune"] else None

    # ---- one epoch of training ----------------------------------------------------------------------------------
    def train_loop(self, epoch: int) -> dict[str, float]:
        """Plain loop: data loss plus l1 x mean |output|, Adam step per batch; returns the epoch's mean losses."""
        return self._train_epoch(epoch)

    def retinotopic_loop(self, epoch: int) -> dict[str, float]:
        """Plain loop plus semantic_scale x semantic loss (one-hot maps) and semantic_l1 x the mean over cells of
        the L1 norm of each cell's one-hot weights (training.py: retinotopic_loop)."""
        return self._train_epoch(epoch, self._onehot_penalties)

    def _onehot_penalties(self) -> dict[str, tuple[float, torch.Tensor]]:
        """The retinotopic loop's extra terms by metric name, each with its weight in the loss."""
        return {"semantic_loss": (self.cfg["semantic_scale"], semantic_loss(self.model.onehot_probs())),
                "onehot_l1": (self.cfg["semantic_l1"], self.model.onehot_weights().abs().sum(dim=1).mean())}

    def _train_epoch(self, epoch: int,
                     penalties: Callable[[], dict[str, tuple[float, torch.Tensor]]] | None = None,
                     ) -> dict[str, float]:
        """One pass over the full training batches (a last partial batch is dropped, as the original did), Adam step
        per batch; pruned channels are re-zeroed after each step.

        `penalties` gives extra loss terms (weight, value) by name; each is added when its weight is > 0 and its
        epoch mean over the steps is returned as a metric either way.
        """
        self.model.train()
        total: torch.Tensor | float = 0.0
        n = 0
        extra: dict[str, torch.Tensor] = {}
        steps = 0
        for x, y in self.data.train.batches(self.cfg["batch_size"], shuffle=self.cfg["shuffle"],
                                            generator=self.shuffle_gen, drop_last=True):
            with self.autocast():
                out = full_precision(self.forward(x))
            loss = self.batch_loss(out, y)
            for name, (weight, term) in (penalties() if penalties is not None else {}).items():
                if weight > 0:
                    loss = loss + weight * term
                extra[name] = extra.get(name, 0.0) + term.detach()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.pruner is not None:
                self.pruner.mask()
            total = total + loss.detach() * len(y)  # summed on the device: no host sync per step
            n += len(y)
            steps += 1
        value = float(total) / n
        if not math.isfinite(value):
            raise TrainingDiverged(f"training loss became {value} in epoch {epoch}; lower lr "
                                   f"(now {self.cfg['lr']:g}) or check the recording")
        return {"train_loss": value, **{name: v.item() / steps for name, v in extra.items()}}

    def fit_epoch(self, epoch: int) -> dict[str, float]:
        """The one epoch of a model fitted in closed form (RevCorLN: fit_revcor on the training split, seeded by
        the run's seed); its training loss is the data loss of the fitted model on the training samples."""
        from trainer.models.revcor import fit_revcor

        fit_revcor(self.model, self.data.train, seed=self.cfg["seed"])
        loss, _ = self.score_outputs(self.predict(self.data.train), self.data.train)
        return {"train_loss": loss}

    def batch_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training objective of one batch: mean data loss plus the l1 penalty (see l1_penalty)."""
        loss = self.loss_fn(out, y)
        if self.cfg["l1"] > 0:
            loss = loss + l1_penalty(self.cfg, out)
        return loss

    # ---- scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, windows: WindowSet) -> torch.Tensor:
        """Model outputs for every sample of `windows`, in batches, in eval mode."""
        self.model.eval()
        batch = score_batch(self.cfg)
        with self.autocast():
            return torch.cat([full_precision(self.forward(x)) for x, _ in windows.batches(batch)])

    def autocast(self) -> Any:
        """bf16 autocast of the forward pass when `precision` is bf16 (losses and metrics stay in fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg["precision"] == "bf16")

    def score(self, windows: WindowSet) -> tuple[float, torch.Tensor]:
        """Data loss and per-cell Pearson r of predicted rates against the split's targets."""
        return self.score_outputs(self.predict(windows), windows)

    def score_outputs(self, out: torch.Tensor, windows: WindowSet) -> tuple[float, torch.Tensor]:
        """Loss and per-cell Pearson r of the evaluated model's outputs `out` for every sample of `windows`.

        The loss is the data loss plus l1 x the per-sample penalty (for the original's summed form, its sum over
        cells: training.py validate_static adds `l1 * norm(outs, 1) / n`)."""
        targets = windows.targets.to(out.device)
        loss = self.loss_fn(self.as_trained(out), targets).item()
        if self.cfg["l1"] > 0:
            loss += (l1_penalty(self.cfg, out[:, None]).mean()).item()
        return loss, pearson_per_cell(as_rates(self.cfg, out), targets)

    def as_trained(self, out: torch.Tensor) -> torch.Tensor:
        """Evaluated outputs in the form the loss was trained on: with softplus off the evaluated model applies the
        original's exp to what trained as log rates (log_poisson), so the loss takes their log again."""
        return out.log() if self.cfg["log_poisson"] and exp_at_eval(self.cfg) else out

    # ---- the run ---------------------------------------------------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None = None) -> FitResult:
        """Train n_epochs (or until early stopping), then prune if asked; start after the checkpoint `resume`."""
        with tf32(self.cfg["precision"] == "tf32"):
            self.start(resume)
            while (epoch := self.next_epoch()) is not None:
                self.end_epoch(epoch, self._epoch(epoch))
            return self.result()

    # The run in steps, so that a pack (trainer/training/packed.py) can drive several Trainers through one
    # shared epoch: start, then next_epoch / (train and score) / end_epoch until next_epoch says None, then result.
    def start(self, resume: dict[str, Any] | None = None) -> None:
        """Begin the run, or go on after the checkpoint `resume` (weights, optimizer, schedule, RNGs, history)."""
        self.history: list[dict[str, float]] = []
        self.best_epoch, self.best_r, self.best_test = 0, -math.inf, math.nan
        self.epoch, self.done, self._pruning = 0, False, False
        self.pruned_epoch, self._replayed = 0, False
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            if self.scheduler is not None and resume.get("scheduler") is not None:
                self.scheduler.load_state_dict(resume["scheduler"])
            self.shuffle_gen.set_state(resume["shuffle_rng"])
            torch.set_rng_state(resume["torch_rng"])
            self.history = list(resume["history"])
            self.best_epoch, self.best_r, self.best_test = \
                resume["best_epoch"], resume["best_val_pearson"], resume["best_test"]
            self.epoch = resume["epoch"]
            if self.pruner is not None and resume.get("pruning") is not None:
                self.pruner.load_state_dict(resume["pruning"])

    def next_epoch(self) -> int | None:
        """The number of the epoch to train next, or None when the run is over.

        Normal epochs go up to n_epochs (or early stopping); then, with prune, pruning epochs until no layer is left.
        """
        pruner = self.pruner
        self._pruning = pruner is not None and pruner.active
        if self.done:
            return None
        if self._pruning and not pruner.begin(self.epoch + 1, self._importance_inputs):
            self.done = True
        elif not self._pruning and self.epoch >= self.n_epochs:
            self.done = True
        if self.done:
            return None
        self.epoch += 1
        return self.epoch

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Judge a trained and scored epoch: best so far, early stopping, pruning; checkpoint and report it."""
        n_epochs, patience, pruner, pruning = self.n_epochs, self.cfg["early_stopping"], self.pruner, \
            self._pruning
        if pruning:
            pruner.end_epoch(epoch, metrics["val_pearson"])  # may revert to the copy taken before pruning
        if pruner is not None:
            metrics.update(pruner.metrics())
        self.history.append({"epoch": epoch, **metrics})

        # A reverted epoch is never an improvement: its r is below a baseline that an earlier epoch scored.
        improved = metrics["val_pearson"] > self.best_r
        if improved:
            self.best_epoch, self.best_r, self.best_test = epoch, metrics["val_pearson"], metrics["test_pearson"]
        normal_over = not pruning and (epoch >= n_epochs or bool(patience) and epoch - self.best_epoch >= patience)
        if normal_over and pruner is not None:  # before the checkpoint, so that a resume goes on pruning
            pruner.start(epoch, metrics["val_pearson"])
        self._checkpoint(epoch, metrics, improved)
        self.reporter.epoch(epoch, metrics)
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics)
        stop = False
        if not pruning and self.stop_check is not None:  # called every normal epoch
            if not self._replayed:  # first, after a resume, the epochs before it (their answers do not count)
                self._replayed = True
                for row in self.history[:-1]:
                    self.stop_check(int(row["epoch"]), row)
            stop = self.stop_check(epoch, metrics)
        if normal_over and pruner is None:
            self.done = True
        elif stop and not normal_over:
            self.done, self.pruned_epoch = True, epoch

    def result(self) -> FitResult:
        """What the run achieved (and, after pruning, pruning.json written and reported)."""
        n_epochs = self.n_epochs
        normal_epochs = self.epoch
        if self.pruner is not None and self.pruner.active:
            normal_epochs = self.pruner.normal_epochs
            self._write_pruning_report()
        return FitResult(epochs_run=self.epoch, best_epoch=self.best_epoch, best_val_pearson=self.best_r,
                         test_pearson_at_best=self.best_test, stopped_early=normal_epochs < n_epochs,
                         history=self.history, pruned_epoch=self.pruned_epoch)

    def _epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch with the selected loop, score validation and test, step the scheduler: the metrics."""
        t0 = time.perf_counter()
        metrics = self.fit_epoch(epoch) if self.fitted else self.loops[self.cfg["train_loop"]](epoch)
        train_seconds = time.perf_counter() - t0
        return self.scored(metrics, self.predict(self.data.val), self.predict(self.data.test), t0, train_seconds)

    def scored(self, metrics: dict[str, float], val_out: torch.Tensor, test_out: torch.Tensor, t0: float,
               train_seconds: float) -> dict[str, float]:
        """An epoch's metrics from its training losses and outputs on validation and test; steps the scheduler.

        `t0` is when the epoch began (perf_counter) and `train_seconds` how long its training pass took.
        """
        self._check_alive(val_out)
        val_loss, val_r = self.score_outputs(val_out, self.data.val)
        test_loss, test_r = self.score_outputs(test_out, self.data.test)
        metrics.update(val_loss=val_loss, val_pearson=val_r.mean().item(), test_loss=test_loss,
                       test_pearson=test_r.mean().item(), lr=self.optimizer.param_groups[0]["lr"])
        for cid, v, t in zip(self.data.cell_ids, val_r.tolist(), test_r.tolist()):
            metrics[f"val_pearson_cell{cid}"] = v
            metrics[f"test_pearson_cell{cid}"] = t
        if isinstance(self.scheduler, OriginalSchedule):
            self.scheduler.step(metrics)
        elif isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["val_pearson"])
        elif self.scheduler is not None:
            self.scheduler.step()
        metrics["epoch_seconds"] = time.perf_counter() - t0
        metrics["samples_per_s"] = len(self.data.train) / train_seconds
        return metrics

    def _check_alive(self, val_out: torch.Tensor) -> None:
        """The divergence rule beyond a non-finite training loss: a run has diverged when its validation
        predictions are not finite, or are constant for every cell (the units no longer respond to the stimulus:
        what a far too large lr leaves, with a finite but exploding loss)."""
        lr = f"lower lr (now {self.cfg['lr']:g}) or check the recording"
        if not torch.isfinite(val_out).all():
            raise TrainingDiverged(f"validation predictions became non-finite in epoch {self.epoch}; {lr}")
        if len(val_out) > 1 and bool((val_out.amax(dim=0) == val_out.amin(dim=0)).all()):
            raise TrainingDiverged(f"every cell's validation predictions are constant after epoch {self.epoch}: "
                                   f"the model no longer responds to the stimulus; {lr}")

    def _importance_inputs(self, epoch: int) -> torch.Tensor:
        """intg_bsize training samples drawn at random for the channel importance of the pruning that begins with
        `epoch` (the original drew them as the first batch of a shuffled epoch). Their own generator, seeded by the
        run's seed and the epoch: the batch order and noise are untouched, and a resumed run draws the same."""
        n = len(self.data.train)
        gen = torch.Generator().manual_seed((self.cfg["seed"] * 1_000_003 + epoch) % 2**63)
        idx = torch.randperm(n, generator=gen)[:min(self.cfg["intg_bsize"], n)]
        return self.data.train.get(idx)[0]

    def _write_pruning_report(self) -> None:
        """Write pruning.json (layers, pruned channels, every judged pruning) to the run folder and report it."""
        path = self.run_dir / PRUNING_REPORT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.pruner.report(), indent=2) + "\n")
        self.reporter.checkpoint(path, PRUNING_REPORT)

    def _checkpoint(self, epoch: int, metrics: dict[str, float], improved: bool) -> None:
        """Write this epoch's checkpoint (and best.pt when it improved); keep older epochs only if asked."""
        state = {
            "format": checkpoint.FORMAT, "epoch": epoch, "metrics": metrics, "history": self.history,
            "best_epoch": self.best_epoch, "best_val_pearson": self.best_r, "best_test": self.best_test,
            # cloned: a packed model's tensors are views of the pack's stacked ones, which torch.save would write
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "torch_rng": torch.get_rng_state(), "shuffle_rng": self.shuffle_gen.get_state(),
            "config": self.cfg, "norm": self.data.norm_stats(), "cell_ids": list(self.data.cell_ids),
            "n_cells": self.data.n_cells, "model_type": self.cfg["model_type"],
            "pruned": self.pruner.zeroed() if self.pruner is not None else {},
            "pruning": self.pruner.state_dict() if self.pruner is not None else None,
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
