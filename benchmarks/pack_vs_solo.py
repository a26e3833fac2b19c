"""How far a packed run lands from the same run trained alone, next to how far two solo runs land that differ only
in their noise draws: the figures behind the README's statement on packing.

    .venv/bin/python benchmarks/pack_vs_solo.py [--epochs 2] [--seeds 1 2 3]

The recording and the run are the demo's (20x20 checkers, BNCNN, noise 0.05, biases on, batch 256, lr 0.005). For
each seed the script trains: `solo` (the run alone, with the pack's batch order), `packed` (the same run as member 0
of a pack of 2), and `solo, other noise` (the run alone again with another stream of noise draws, nothing else
changed). With noise 0 and biases off, packed and solo differ only by float rounding.
The same for biases off, noise off, and both off. It prints epoch-1 val_loss and the best validation r of each run,
then the mean and largest differences from `solo`. About 25 s a seed and setting on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import config  # noqa: E402
from trainer.data.recording import load_data, recording_path  # noqa: E402
from trainer.data.synth import write_synthetic  # noqa: E402
from trainer.launch.local import seed_everything  # noqa: E402
from trainer.models import build_model, prepare_model  # noqa: E402
from trainer.training.packed import PackedTrainer  # noqa: E402
from trainer.training.trainer import Trainer  # noqa: E402


def trainer(bundle, cfg: dict, folder: Path, batch_seed: int, noise_seed: int | None = None) -> Trainer:
    """A Trainer built as the launcher builds one; `noise_seed` reseeds the noise draws after the weights are made."""
    seed_everything(cfg["seed"])
    model = build_model(cfg, bundle.n_cells)
    prepare_model(model, cfg, bundle)
    t = Trainer(model, bundle, cfg, folder, torch.device("cpu"))
    t.shuffle_gen = torch.Generator().manual_seed(batch_seed)
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
    return t


def summary(history: list[dict]) -> tuple[float, float]:
    return history[0]["val_loss"], max(h["val_pearson"] for h in history)


def measure(bundle, base: dict, seed: int, folder: Path) -> dict[str, tuple[float, float]]:
    cfg = config.resolve({**base, "seed": seed})
    other = config.resolve({**base, "seed": seed + 1000, "lr": base["lr"] * 0.5})  # the pack's second member
    out = {"solo": summary(trainer(bundle, cfg, folder / "solo", seed).fit().history)}
    noisy = trainer(bundle, cfg, folder / "noise", seed, noise_seed=seed + 7)
    out["solo, other noise"] = summary(noisy.fit().history)
    members = [trainer(bundle, cfg, folder / "p0", seed), trainer(bundle, other, folder / "p1", seed)]
    done: dict = {}
    PackedTrainer(members).fit([None, None], lambda i, o: done.__setitem__(i, o))
    out["packed"] = summary(done[0].history)
    return out


SETTINGS = {  # label -> overrides of the demo's run
    "noise 0.05, bias on (demo)": {},
    "noise 0.05, bias off": {"bias": False},
    "noise 0, bias on": {"noise": 0.0},
    "noise 0, bias off": {"noise": 0.0, "bias": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = json.loads((ROOT / "examples" / "hyperparams.json").read_text())
    base = {k: v for k, v in demo.items() if k not in ("exp_name", "save_root")}
    base.update(n_epochs=args.epochs, early_stopping=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic(tmp / "data", "synth01", "whitenoise", n_cells=5, size=20, train_frames=12000,
                        test_frames=1500, n_repeats=5, history=20, seed=0)
        bundle = load_data(recording_path(tmp / "data", "synth01", "whitenoise"), img_shape=base["img_shape"])
        print(f"# packed vs solo: the demo's recording and run, {args.epochs} epochs, seeds {args.seeds}; torch "
              f"{torch.__version__}, {platform.machine()}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
        print("\n| settings | seed | run | epoch-1 val_loss | best val r |\n|---|---|---|---|---|")
        for label, extra in SETTINGS.items():
            for seed in args.seeds:
                res = measure(bundle, {**base, **extra}, seed, tmp / f"{len(rows)}")
                rows.append((label, res))
                for name, (loss, r) in res.items():
                    print(f"| {label} | {seed} | {name} | {loss:.4f} | {r:.4f} |", flush=True)
    print("\nDifferences from `solo`, over the seeds: mean (largest) of |difference|\n")
    print("| settings | packed: epoch-1 val_loss | packed: best val r | other noise: epoch-1 val_loss "
          "| other noise: best val r |\n|---|---|---|---|---|")
    for label in SETTINGS:
        cells = []
        for name in ("packed", "solo, other noise"):
            for k in (0, 1):
                d = [abs(res[name][k] - res["solo"][k]) for lab, res in rows if lab == label]
                cells.append(f"{sum(d) / len(d):.4f} ({max(d):.4f})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
