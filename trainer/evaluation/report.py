"""Evaluate a trained model on a recording's test split: scores, the per-cell table and the plots.

Used at the end of every run (on its best checkpoint) and by `retina-trainer evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from trainer.data.recording import read_truth
from trainer.data.windows import DataBundle
from trainer.evaluation import metrics, plots


@dataclass
class Evaluation:
    """Scores of one model on one test split, and the files that show them."""

    result: dict
    scalars: dict[str, float]
    table: str
    files: list[tuple[str, Path]] = field(default_factory=list)  # (artifact folder, file)
    repeats_note: str = ""


def repeats_as_rates(repeats: np.ndarray | None, target: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Single trials in the target's units (Hz): spike counts are smoothed like firing_rate_10ms, rates kept.

    The recording does not say which it stores, so the units are told apart by the mean against the trial
    average. The smoothing starts at the first test sample, so its first few bins miss earlier spikes.
    """
    if repeats is None:
        return None, "no test repeats in the recording"
    if repeats.shape[0] < 2:
        return None, "fewer than 2 test repeats"
    m = max(float(target.mean()), 1e-12)
    for candidate, what in ((metrics.counts_to_rates(repeats), "spike counts"), (repeats, "rates")):
        if 0.5 <= float(candidate.mean()) / m <= 2.0:
            return candidate, f"{repeats.shape[0]} test repeats read as {what}"
    return None, "test repeats are in units that match neither spike counts nor the target's rates; skipped"


def evaluate_predictions(pred: np.ndarray, data: DataBundle) -> Evaluation:
    """Scores of test predictions (T_test_samples, n_cells, in Hz) against the bundle's test split."""
    target = data.test.targets.cpu().numpy().astype(np.float64)
    repeats, note = repeats_as_rates(data.test_repeats, target)
    truth = read_truth(data.path, "test", data.cell_ids)
    if truth is not None:
        truth = truth[data.img_shape[0]:]
    result = metrics.evaluate(pred, target, repeats=repeats, truth=truth)
    scal = {f"eval_{k}": v for k, v in metrics.scalars(result).items()}
    return Evaluation(result, scal, metrics.per_cell_table(result, data.cell_ids), repeats_note=note)


REPORT_FILES = ("per_cell.csv", "predictions.png", "filters.png", "curves.png")  # what write_report may write


def write_report(ev: Evaluation, pred: np.ndarray, data: DataBundle, model: nn.Module, history: list[dict],
                 folder: Path, plots_too: bool = True) -> Evaluation:
    """Write the per-cell table and, unless `plots_too` is false, the plots (curves, best/worst cell predictions,
    first-layer filters: about 2 s together)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "per_cell.csv"
    table.write_text(ev.table)
    ev.files = [("eval", table)]
    if not plots_too:
        return ev
    target = data.test.targets.cpu().numpy()
    ev.files += [("plots", plots.plot_predictions(pred, target, data.cell_ids, ev.result["test_pearson"],
                                                 folder / "predictions.png", score_name="test r")),
                ("plots", plots.plot_filters(model, folder / "filters.png"))]
    if history:
        ev.files.append(("plots", plots.plot_curves(history, folder / "curves.png")))
    return ev
