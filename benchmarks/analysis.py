"""Section 7, analysis after training (opt-in: `--only analysis`): what the analyses cost per run, and the
measurements behind their defaults and science check.

* cost: a run of the demo's configuration (examples/hyperparams.json: BNCNN 20x20x20, 4 epochs on the demo's
  12,000-frame recording) trains, then every analysis runs on it, timed part by part in the same process; the
  share is analysis / (training + analysis). With `--full-shape` also the default BNCNN at 40x50x50: its training
  speed measured on a short recording, one epoch of the published 60-minute recording (324,000 training samples)
  extrapolated from it, against the analyses of the same model measured whole.
* STA frames: the receptive-field maps of the trained demo model from N noise frames against those from 20,000
  (the original drew 10,000): the smallest r over cells, per N.
* STA hold and science: BNCNNs trained as in tests/test_analysis_science.py (seeds 0-2; 0 with --quick), each
  cell's map against the true cell's STA to the same noise, held 1 bin (the original's noise) and 3 bins (the
  default, as the recordings hold their frames); and the interneuron match against the untrained control.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Results

TESTS = Path(__file__).resolve().parents[1] / "tests"
PUBLISHED_TRAIN_SAMPLES = 324_000  # a published recording: about 360,000 training frames (60 min), 90% trained on


def _train(cfg: dict, rec: Path, folder: Path):
    from trainer.data.recording import load_data
    from trainer.launch.local import seed_everything
    from trainer.models import build_model, prepare_model
    from trainer.training import checkpoint
    from trainer.training.trainer import Trainer

    bundle = load_data(rec, img_shape=cfg["img_shape"])
    seed_everything(cfg["seed"])
    model = build_model(cfg, bundle.n_cells)
    prepare_model(model, cfg, bundle)
    t0 = time.perf_counter()
    result = Trainer(model, bundle, cfg, folder, torch.device("cpu")).fit()
    seconds = time.perf_counter() - t0
    model.load_state_dict(checkpoint.load(folder / checkpoint.BEST)["model"])
    return model, bundle, result, seconds


def _analyze(model, cfg, bundle, rec: Path, out: Path, names=None):
    from trainer import analysis
    from trainer.analysis.run import Model, analyze

    return analyze(Model(model, cfg, bundle.cell_ids, bundle.stim_mean, bundle.stim_std), out,
                   names or analysis.selection("all"), recording=rec)


def bench_analysis(res: Results, args: argparse.Namespace, tmp: Path, device: str) -> None:
    """Section 7 (see the module docstring). On CPU whatever `device` is."""
    import json

    from trainer import config
    from trainer.analysis import receptive_fields as rf
    from trainer.analysis.sta import decompose, pearson
    from trainer.data.synth import write_synthetic

    folder = tmp / "analysis"
    demo = json.loads((Path(__file__).resolve().parents[1] / "examples" / "hyperparams.json").read_text())
    demo_cfg = config.resolve({k: v for k, v in demo.items() if k in config.BY_NAME and k not in ("save_root",)})
    frames = 3000 if args.quick else 12000
    rec = write_synthetic(folder / "data", "demo", n_cells=5, size=20, train_frames=frames, test_frames=1500,
                          n_repeats=5, history=20, seed=0, overwrite=True, interneurons=3000)
    model, bundle, result, train_s = _train(demo_cfg, rec, folder / "demo_run")
    report = _analyze(model, demo_cfg, bundle, rec, folder / "demo_out")
    total = report.metrics["analysis_seconds"]
    shape = "BNCNN 20x20x20 (the demo's)"
    res.add("analysis", "demo run: training", train_s, "s", f"{demo_cfg['n_epochs']} epochs on {frames:,} frames, "
            f"{shape}, its evaluation not included")
    for part, seconds in report.seconds.items():
        res.add("analysis", f"demo run: {part}", seconds, "s", "")
    res.add("analysis", "demo run: analysis share of the run", total / (total + train_s), "fraction",
            f"analysis {total:.1f} s / (training {train_s:.1f} s + analysis)")
    cheap = report.seconds.get("receptive_fields", 0.0)
    res.add("analysis", "demo run: --only receptive_fields share", cheap / (cheap + train_s), "fraction",
            "the cheapest part alone")

    ref = rf.compute(model, demo_cfg, seed=99, n_frames=20000)
    for n in (500, 1000, 2000, 5000):
        f = rf.compute(model, demo_cfg, seed=1, n_frames=n)
        r = min(pearson(f.spatial[i], ref.spatial[i]) for i in range(len(f.spatial)))
        res.add("analysis", f"STA from {n:,} noise frames: r with 20,000", r, "r (min over cells)",
                "default 2,000" if n == rf.N_FRAMES else "")

    if args.full_shape:
        full = config.resolve({"img_shape": [40, 50, 50], "seed": 0, "n_epochs": 1, "batch_size": 128})
        rec50 = write_synthetic(folder / "data", "full", n_cells=5, size=50, train_frames=args.full_frames + 800,
                                test_frames=600, n_repeats=2, history=40, seed=0, overwrite=True, interneurons=3000)
        model50, bundle50, result50, _ = _train(full, rec50, folder / "full_run")
        sps = result50.history[-1]["samples_per_s"]
        epoch = PUBLISHED_TRAIN_SAMPLES / sps
        report50 = _analyze(model50, full, bundle50, rec50, folder / "full_out")
        total50 = report50.metrics["analysis_seconds"]
        res.add("analysis", "full shape: training speed", sps, "samples/s", "BNCNN 40x50x50, batch 128")
        for part, seconds in report50.seconds.items():
            res.add("analysis", f"full shape: {part}", seconds, "s", "")
        res.add("analysis", "full shape: analysis share of a 1-epoch run", total50 / (total50 + epoch), "fraction",
                f"analysis {total50:.0f} s against one epoch of the published recording ({epoch / 3600:.1f} h at "
                "the speed above)")
    else:
        res.add("analysis", "full shape", None, "", "needs --full-shape")

    sys.path.insert(0, str(TESTS))
    import test_analysis_science as sci  # noqa: E402  (the science check's recording and training)

    seeds = [0] if args.quick else [0, 1, 2]
    for seed in seeds:
        root = folder / f"science{seed}"
        res_sci = sci.train_and_analyze(root, seed)
        res.add("analysis", f"science seed {seed}: interneuron r, trained / control",
                res_sci["analysis_intr_r_mean"], "r", f"control {res_sci['analysis_intr_control_r_mean']:.3f}, gain "
                f"{res_sci['analysis_intr_r_gain']:.3f} over {res_sci['analysis_intr_n_cells']:.0f} subunits")
        from trainer.inference import load_checkpoint

        loaded = load_checkpoint(root / f"run{seed}" / "best.pt")
        for hold in (1, 3):
            truth_rec = write_synthetic(root / f"hold{hold}", f"analysis{seed}", "whitenoise", seed=seed,
                                        overwrite=True, sta_hold=hold, **sci.RECORDING)
            import h5py

            with h5py.File(truth_rec) as f:
                true = f["ground_truth/sta"][()]
            fields = rf.compute(loaded.model, loaded.config, seed=seed, hold=hold)
            rs = [pearson(fields.spatial[i], decompose(true[i])[0]) for i in range(len(true))]
            right = sum(decompose(true[i])[2] == fields.polarity[i] for i in range(len(true)))
            res.add("analysis", f"science seed {seed}: receptive fields, noise held {hold}", float(np.min(rs)),
                    "r (min over cells)", f"mean {np.mean(rs):.3f}, labels right {right}/{len(rs)}"
                    + (" (default)" if hold == rf.HOLD else " (the original's noise)"))
