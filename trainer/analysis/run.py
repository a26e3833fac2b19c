"""Run the analyses of one trained model and write their files: what a run does at its end and `analyze` does.

Files (the contract, docs/analysis.md): receptive_fields.h5, phenomena.json, interneurons.csv (and
interneurons_control.csv), attribution.json, analysis.json (what ran, what was skipped and why, seconds, settings)
and the plots receptive_fields.png, <phenomenon>.png, interneurons.png. In MLflow the data files go under
analysis/, the plots under plots/analysis/, the statistics as metrics analysis_<name>_<statistic>.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.analysis import NEEDS_HIDDEN, phenomena_of, stimuli
from trainer.analysis import attribution as attr
from trainer.analysis import interneurons as intr
from trainer.analysis import phenomena as phen
from trainer.analysis import receptive_fields as rf
from trainer.analysis.units import hidden_layers, rates
from trainer.errors import ConfigError, DataError
from trainer.models import build_model

DATA, PLOTS = "analysis", "plots/analysis"  # the artifact folders
INTERNEURON_FOLDER = "interneurons"  # beside a recording: the default interneuron files
FILES = ("receptive_fields.h5", "phenomena.json", "interneurons.csv", "interneurons_control.csv", "attribution.json",
         "analysis.json", "receptive_fields.png", "interneurons.png", *(f"{p}.png" for p in phen.NAMES))


@dataclass
class Model:
    """What the analyses need of a trained model: its weights, configuration, cells and stimulus normalisation."""

    model: nn.Module
    config: dict[str, Any]
    cell_ids: list[int]
    mean: float
    std: float


@dataclass
class Report:
    """The outcome: metrics, files (artifact folder, path), parts skipped (name -> why) and seconds per part."""

    metrics: dict[str, float] = field(default_factory=dict)
    files: list[tuple[str, Path]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def default_interneurons(recording: Path | None) -> list[Path]:
    """The interneuron files beside a recording (its folder's interneurons/), or none."""
    if recording is None:
        return []
    folder = Path(recording).parent / INTERNEURON_FOLDER
    return intr.find_files([folder]) if folder.is_dir() and any(folder.glob("*.h5")) else []


def control_model(cfg: dict[str, Any], n_cells: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The untrained control: the architecture built from the run's seed, as the run built its initial weights
    (torch's generator seeded with it; the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))
        model = build_model(cfg, n_cells)
    return model.to(device=device, dtype=dtype).eval()


def check_recording(recording: Path, cfg: dict[str, Any]) -> None:
    """A recording used by the analyses must have frames of the model's size."""
    import h5py

    with h5py.File(recording, "r") as f:
        node = f.get("test/stimulus") or f.get("train/stimulus")
        shape = tuple(node.shape[1:]) if node is not None else None
    size = tuple(int(s) for s in cfg["img_shape"][1:])
    if shape != size:
        raise DataError(f"{recording}: its frames are {'x'.join(map(str, shape)) if shape else 'missing'}, the model "
                        f"takes {size[0]}x{size[1]}; give the recording the model was trained on (--recording)")


def analysis_windows(loaded: Model, recording: Path | None, n: int, seed: int) -> tuple[np.ndarray, str]:
    """Windows for the attribution: `n` evenly spaced ones of the recording's test split (normalised as in
    training), or Gaussian white noise without a recording."""
    history = int(loaded.config["img_shape"][0])
    if recording is not None:
        from trainer.data.recording import read_stimulus

        frames, _ = read_stimulus(recording, "test")
        frames = (frames.astype(np.float32) - loaded.mean) / loaded.std
        starts = np.linspace(0, len(frames) - history - 1, min(n, len(frames) - history)).astype(int)
        return np.stack([frames[s:s + history] for s in starts]), f"{len(starts)} windows of the test split of " \
                                                                    f"{recording}"
    size = tuple(int(s) for s in loaded.config["img_shape"][1:])
    noise = np.random.default_rng(seed).standard_normal((n + history, *size)).astype(np.float32)
    return stimuli.windows(noise, history), f"{n} windows of Gaussian white noise (contrast 1)"


def analyze(loaded: Model, out: Path, names: list[str], *, recording: Path | None = None,
            interneurons: list[Path] | None = None, required: frozenset[str] = frozenset(), plots: bool = True,
            source: str = "", echo: Callable[[str], None] | None = None) -> Report:
    """Run the analyses `names` (trainer.analysis.selection) and write their files into the folder `out`.

    `interneurons`: files or folders; None means those beside the recording (default_interneurons). A part that
    cannot run for this model (interneurons and attribution of a model without hidden layers, interneurons without
    files) is skipped with its reason, or, when it is `required` (the user asked for it), a ConfigError/DataError."""
    cfg, model = loaded.config, loaded.model.eval()
    seed = int(cfg["seed"])
    history = int(cfg["img_shape"][0])
    size = (int(cfg["img_shape"][1]), int(cfg["img_shape"][2]))
    report = Report()
    out.mkdir(parents=True, exist_ok=True)
    if recording is not None:
        check_recording(recording, cfg)
    files = intr.find_files(interneurons) if interneurons else default_interneurons(recording)
    no_hidden = f"{type(model).__name__} has no hidden layers (it reads the stimulus directly)"
    for name in NEEDS_HIDDEN:
        if name in names and not hidden_layers(model):
            if name in required:
                raise ConfigError(f"{name}: {no_hidden}; {name} needs a model with hidden conv layers (e.g. BNCNN), "
                                  "so leave it out for this model")
            report.skipped[name] = no_hidden
    if "interneurons" in names and "interneurons" not in report.skipped and not files:
        why = "no interneuron recordings: give --interneurons FILE_OR_DIR (the original's cell-type files)" + \
              (f" or put them in {Path(recording).parent / INTERNEURON_FOLDER}" if recording is not None else "")
        if "interneurons" in required:
            raise DataError(f"interneurons: {why}")
        report.skipped["interneurons"] = why
    # the interneuron files are read (and checked) before anything is computed
    recorded = [intr.read(f, size, history) for f in files] \
        if "interneurons" in names and "interneurons" not in report.skipped else []
    say = echo or (lambda m: None)

    def timed(part: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        fn()
        report.seconds[part] = round(time.perf_counter() - t0, 3)
        say(f"analysis: {part} done in {report.seconds[part]:.1f} s")

    def receptive_fields() -> None:
        hold = int(cfg["analysis_sta_hold"])
        fields = rf.compute(model, cfg, seed, hold=hold)
        truth = rf.truth_scores(fields, recording, loaded.cell_ids, hold)
        settings = {"method": "gradient (utils.compute_sta)", "noise": "Gaussian", "contrast": rf.CONTRAST,
                    "hold": hold, "n_frames": rf.N_FRAMES, "seed": seed}
        report.files.append((DATA, rf.write(fields, loaded.cell_ids, out / "receptive_fields.h5", settings, truth)))
        report.metrics.update(rf.summary(fields, truth))
        if plots:
            report.files.append((PLOTS, rf.plot(fields, loaded.cell_ids, out / "receptive_fields.png", truth)))

    def phenomena() -> None:
        def predict(frames: np.ndarray) -> np.ndarray:
            return rates(model, cfg, stimuli.windows(frames, history))

        results = phen.run(predict, size, history, seed, which)
        path = out / "phenomena.json"
        path.write_text(json.dumps(phen.as_json(results, {"size": list(size), "history": history, "seed": seed}),
                                   indent=1, default=_jsonable))
        report.files.append((DATA, path))
        report.metrics.update(phen.metrics(results))
        for name, r in results.items():
            if "skipped" in r:
                report.skipped[name] = r["skipped"]
            elif plots:
                report.files.append((PLOTS, phen.plot(name, r, out / f"{name}.png")))

    def interneurons_() -> None:
        param = next(model.parameters())
        control = control_model(cfg, len(loaded.cell_ids), param.device, param.dtype)
        trained, untrained = intr.analyze(model, control, recorded, history)
        report.files.append((DATA, intr.write_csv(trained, out / "interneurons.csv")))
        report.files.append((DATA, intr.write_csv(untrained, out / "interneurons_control.csv")))
        report.metrics.update(intr.metrics(trained, untrained))
        if plots:
            report.files.append((PLOTS, intr.plot(trained, untrained, out / "interneurons.png")))

    def attribution() -> None:
        x, where = analysis_windows(loaded, recording, int(cfg["intg_bsize"]), seed)
        layers = attr.compute(model, x, int(cfg["alpha_steps"]))
        path = out / "attribution.json"
        doc = {"method": "integrated gradients from a zero stimulus (utils.integrated_gradient)",
               "alpha_steps": int(cfg["alpha_steps"]), "stimulus": where, "cells": loaded.cell_ids,
               "layers": layers}
        path.write_text(json.dumps(doc, indent=1))
        report.files.append((DATA, path))
        report.metrics.update(attr.metrics(layers))

    parts = {"receptive_fields": receptive_fields, "phenomena": phenomena, "interneurons": interneurons_,
             "attribution": attribution}
    started = time.perf_counter()
    which = phenomena_of(names)  # every phenomenon with "phenomena", else those named
    for part, fn in parts.items():
        if (part in names or part == "phenomena" and which) and part not in report.skipped:
            timed(part, fn)
    report.metrics["analysis_seconds"] = round(time.perf_counter() - started, 3)
    summary = {"model": source, "selected": [n for n in names if n in parts or n in phen.NAMES],
               "ran": [p for p in parts if p in report.seconds], "skipped": report.skipped,
               "seconds": report.seconds, "metrics": report.metrics,
               "interneuron_files": [str(f) for f in files], "recording": str(recording) if recording else None}
    path = out / "analysis.json"
    path.write_text(json.dumps(summary, indent=1))
    report.files.append((DATA, path))
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")
