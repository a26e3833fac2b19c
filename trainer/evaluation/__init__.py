"""Evaluation of trained models on the test split: per-cell scores (`metrics`) and figures (`plots`)."""

from trainer.evaluation.metrics import (
    cc_max,
    cc_norm,
    counts_to_rates,
    evaluate,
    explainable_fraction,
    feve,
    pearson,
    per_cell_table,
    reliability_loo,
    reliability_split_half,
    scalars,
    signal_power,
)

__all__ = ["cc_max", "cc_norm", "counts_to_rates", "evaluate", "explainable_fraction", "feve", "pearson",
           "per_cell_table", "reliability_loo", "reliability_split_half", "scalars", "signal_power"]
