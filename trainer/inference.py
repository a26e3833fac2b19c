"""Use a trained model: load it from a checkpoint, a run or the model registry, and predict firing rates.

    from trainer.inference import load_model
    m = load_model("models:/demo@champion")      # or "runs:/<run id>", a bare run id, or a local best.pt
    rates = m.predict(stimulus)                   # (T, H, W) frames as stored -> (T - h, n_cells) rates

Loading from MLflow uses $MLFLOW_TRACKING_URI (or the embedded store in the working directory).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import config
from trainer.errors import UserError
from trainer.models import build_model
from trainer.training import checkpoint
from trainer.training.trainer import as_rates


@dataclass
class LoadedModel:
    """A model ready to predict: weights in eval mode plus everything needed to feed it as in training."""

    model: nn.Module
    config: dict[str, Any]
    mean: float
    std: float
    cell_ids: list[int]
    epoch: int
    source: str
    run_id: str = ""  # the MLflow run it came from, when loaded from MLflow

    @property
    def history(self) -> int:
        return int(self.config["img_shape"][0])

    def served(self) -> RatePredictor:
        """This model as the module MLflow serves (a copy on the CPU)."""
        import copy

        return RatePredictor(copy.deepcopy(self.model).cpu(), self.config, self.mean, self.std)

    @torch.no_grad()
    def predict(self, stimulus: np.ndarray | torch.Tensor, batch_size: int = 1024,
                device: str | torch.device = "cpu") -> np.ndarray:
        """Predicted rates for every window of `stimulus` (T, H, W): row i is the rate at frame i + history."""
        stim = torch.as_tensor(np.asarray(stimulus)) if not isinstance(stimulus, torch.Tensor) else stimulus
        h, height, width = self.config["img_shape"]
        if stim.dim() != 3 or tuple(stim.shape[1:]) != (height, width):
            raise UserError(f"stimulus has shape {tuple(stim.shape)} but the model takes (T, {height}, {width}) "
                            f"frames")
        if stim.shape[0] <= h:
            raise UserError(f"stimulus has {stim.shape[0]} frames; the model needs more than its history of {h}")
        module = RatePredictor(self.model.to(device), self.config, self.mean, self.std, batch_size)
        return module(stim.to(device)).cpu().numpy()


class RatePredictor(nn.Module):
    """A trained model as MLflow serves it (`mlflow models serve`, `mlflow.pyfunc.load_model`): raw stimulus frames
    (T, H, W), in the units the recording stores them, in; predicted rates (T - history, n_cells) in Hz out, row i
    the rate at frame i + history, as `retina-trainer predict` writes them. The stimulus normalisation of training
    is inside."""

    def __init__(self, model: nn.Module, config: dict[str, Any], mean: float, std: float, batch_size: int = 256):
        super().__init__()
        self.model = model.eval()
        self.config = dict(config)
        self.mean, self.std = float(mean), float(std)
        self.history = int(config["img_shape"][0])
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def forward(self, stimulus: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        stim = stimulus.to(torch.float32)
        h = self.history
        n = stim.shape[0] - h
        offsets = torch.arange(h, device=stim.device)
        out = []
        for start in range(0, max(n, 0), self.batch_size):
            starts = torch.arange(start, min(start + self.batch_size, n), device=stim.device)
            x = (stim[starts[:, None] + offsets] - self.mean) / self.std
            out.append(as_rates(self.config, self.model(x)).float())
        return torch.cat(out) if out else stim.new_zeros((0, 0))


def load_checkpoint(path: str | Path, source: str | None = None) -> LoadedModel:
    """Rebuild the model a checkpoint file was written for and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = checkpoint.load(path)
    except Exception as exc:
        raise UserError(f"{path} is not a readable retina-trainer checkpoint ({type(exc).__name__})") from None
    missing = [k for k in ("model", "config", "norm", "cell_ids") if k not in state]
    if missing:
        raise UserError(f"{path} is not a retina-trainer checkpoint: it lacks {', '.join(missing)}")
    cfg = config.resolve({k: v for k, v in state["config"].items() if k in config.BY_NAME})
    model = build_model(cfg, len(state["cell_ids"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{path}: its weights do not fit a {cfg['model_type']} of this retina-trainer "
                        f"({str(exc).splitlines()[0]}); a checkpoint of retina-trainer before 0.2 "
                        "(RetinotopicModel) must be trained again") from None
    if state.get("format", 1) < checkpoint.FORMAT:
        _as_before_0_2(model)
    _set_bn_eps(model, state.get("bn_eps") or {}, path)
    model.eval()
    return LoadedModel(model=model, config=cfg, mean=float(state["norm"]["mean"]),
                       std=float(state["norm"]["std"]), cell_ids=list(state["cell_ids"]), epoch=int(state["epoch"]),
                       source=source or str(path))


def _as_before_0_2(model: nn.Module) -> None:
    """A model trained by retina-trainer 0.1 computes as it did there: batch norms with torch's eps (1e-5, not the
    original's 1e-3)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-5


def _set_bn_eps(model: nn.Module, eps: dict[str, float], path: Path) -> None:
    """Batch norms of an imported model that the original built with another eps than ours (the checkpoint's
    `bn_eps`, {module name: eps}, written by trainer.importer; e.g. a0c756d's convgc output batch norm, 1e-5)."""
    for name, value in eps.items():
        try:
            module = model.get_submodule(str(name))
        except AttributeError:
            module = None
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UserError(f"{path}: its bn_eps names {name!r}, which is no batch norm of its model; import the "
                            "original's checkpoint again")
        module.eps = float(value)


def load_model(ref: str | Path) -> LoadedModel:
    """Load from a local checkpoint file, `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID` or a run id."""
    ref_s = str(ref)
    if Path(ref_s).is_file():
        return load_checkpoint(ref_s)
    from trainer.tracking import download_best_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path, run_id = download_best_checkpoint(ref_s, Path(tmp))
        loaded = load_checkpoint(path, source=ref_s)
    loaded.run_id = run_id
    return loaded


def write_predictions(loaded: LoadedModel, recording: str | Path, out: str | Path, force: bool = False) -> Path:
    """Predict every group of `recording` that has a stimulus and write the rates to `out` atomically."""
    from trainer.data.h5write import atomic_h5
    from trainer.data.recording import read_stimulus, stimulus_groups

    recording, out = Path(recording).expanduser(), Path(out).expanduser()
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    groups = stimulus_groups(recording)
    if not groups:
        raise UserError(f"{recording}: no train/stimulus or test/stimulus to predict from")
    h = loaded.history
    with atomic_h5(out) as f:
        f.attrs.update(model=loaded.source, cell_ids=np.asarray(loaded.cell_ids), history=h,
                       recording=str(recording), first_frame=h)
        for group in groups:
            frames, time = read_stimulus(recording, group)
            f[f"{group}/firing_rate"] = loaded.predict(frames).T.astype(np.float32)
            f[f"{group}/time"] = time[h:]
    return out
