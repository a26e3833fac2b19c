"""Section 5, packing: K runs trained as one pack (`--pack K`) against the same runs one after another, as a
training pass alone and as whole searches through run_search.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Results, Workload, _prepare_store, _sync, median, shapes, tracking_uri

GOAL_PACK = 3.0  # on a GPU, a pack of 32 at least 3x the model-samples/s of a sequential search


def pack_sizes(args: argparse.Namespace, cuda: bool) -> list[int]:
    if args.pack_sizes:
        return args.pack_sizes
    if cuda:
        return [8, 32]
    return [4] if args.quick else [4, 8]


def bench_pack(res: Results, args: argparse.Namespace, tmp: Path, device: str) -> None:
    """K runs packed on one batch stream against the same K runs one after another: the training pass alone
    (interleaved epochs, model-samples/s) and whole searches through run_search (wall time)."""
    from trainer.launch.local import run_search, seed_everything
    from trainer.models import build_model
    from trainer.search import expand
    from trainer.training.packed import PackedTrainer, StackedModels
    from trainer.training.trainer import NullReporter, Trainer, tf32

    cuda = device.startswith("cuda")
    for shape in shapes(args, cuda):
        folder = tmp / f"pack-{shape.name}"
        folder.mkdir()
        w = Workload(shape, folder, device)
        full_cpu = shape.name == "full" and not cuda
        reps = max(2, args.reps - 1) if full_cpu else args.reps

        def member(i: int, precision: str) -> Trainer:
            cfg = dict(w.cfg, lr=w.cfg["lr"] * (1 + 0.1 * i), seed=100 + i, precision=precision)
            seed_everything(cfg["seed"])
            model = build_model(cfg, w.data.n_cells)
            return Trainer(model, w.data, cfg, folder / f"m{i}", w.device, NullReporter())

        precisions = args.pack_precisions or (["fp32", "bf16"] if cuda else ["fp32"])
        for precision, k in ((p, k) for p in precisions for k in pack_sizes(args, cuda)):
            solo = member(0, precision)
            trainers = [member(i, precision) for i in range(k)]
            packed = PackedTrainer(trainers)
            pack = StackedModels([t.model for t in trainers])

            def solo_epoch() -> float:  # model-samples/s of one model = of K models one after another
                _sync(w.device)
                t = time.perf_counter()
                with tf32(precision == "tf32"):
                    solo.loops["train_loop"](1)
                _sync(w.device)
                return w.n_train / (time.perf_counter() - t)

            def pack_epoch() -> float:
                _sync(w.device)
                t = time.perf_counter()
                with tf32(precision == "tf32"):
                    packed._train_epoch(pack, trainers)
                _sync(w.device)
                return k * w.n_train / (time.perf_counter() - t)

            solo_epoch()
            pack_epoch()  # warm-up (allocator, vmap tracing): not measured
            one, many = [], []
            for _ in range(reps):  # alternating, so that a change of load moves both sides
                one.append(solo_epoch())
                many.append(pack_epoch())
            ratio = median([m / o for m, o in zip(many, one)])
            note = (f"{shape.label()}, {precision}; {w.n_train} samples/epoch; median of {reps} alternating "
                    f"epochs")
            tag = f"{shape.name}{'' if precision == 'fp32' else ' ' + precision}"
            res.add("pack", f"{tag}: one model, training pass", median(one), "model-samples/s", note)
            res.add("pack", f"{tag}: pack of {k}, training pass", median(many), "model-samples/s",
                    "K members' samples per second, one shared batch stream")
            res.add("pack", f"{tag}: ratio pack of {k} / {k} sequential (training pass)", ratio, "x",
                    "median of the per-repetition ratios")
            if cuda and k == 32 and shape.name == "full":
                res.goal(f"full {precision} pack of 32 / sequential = {ratio:.2f}x: "
                         f"{'met' if ratio >= GOAL_PACK else 'missed'} (goal >= {GOAL_PACK} on a GPU)")

        # whole searches: K runs (lr x K) through run_search, packed and one after another, same store
        k = max(pack_sizes(args, cuda))
        epochs = 1 if full_cpu else 2
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        exp = f"pack_{shape.name}"
        _prepare_store(uri, [exp], folder / "artifacts")
        walls: dict[Any, list[float]] = {1: [], k: [], "quiet": []}
        for r in range(1 if full_cpu or args.quick else 2):
            for size in (1, k, "quiet") if r % 2 == 0 else ("quiet", k, 1):
                plots = size != "quiet"
                pack = k if size == "quiet" else size
                hp = dict(w.hp, exp_name=exp, n_epochs=epochs, seed=5000 + 100 * r + (pack if plots else 99))
                hp_file, hr_file = folder / "hp-pack.json", folder / "hr-pack.json"
                hp_file.write_text(json.dumps(hp))
                hr_file.write_text(json.dumps({"lr": [w.cfg["lr"] * (1 + 0.1 * i) for i in range(k)]}))
                search = expand(hp_file, hr_file)
                messages: list[str] = []
                with tracking_uri(uri), contextlib.redirect_stdout(sys.stderr):
                    t = time.perf_counter()
                    outcome = run_search(search, echo=messages.append, progress=False, pack=pack, plots=plots)
                    walls[size].append(time.perf_counter() - t)
                bad = [o for o in outcome.runs if o.status != "FINISHED"]
                if bad:
                    raise RuntimeError(f"packing benchmark run ended {bad[0].status}: {bad[0].error}")
                print(f"  search of {k} runs, --pack {pack}{'' if plots else ' --no-plots'}: "
                      f"{walls[size][-1]:.1f} s", file=sys.stderr)
        seq, pk = median(walls[1]), median(walls[k])
        res.add("pack", f"{shape.name}: search of {k} runs, one after another", seq, "s",
                f"run_search, {epochs} epochs each, sqlite MLflow store, incl. scoring, checkpoints, evaluation")
        res.add("pack", f"{shape.name}: the same search with --pack {k}", pk, "s", "")
        res.add("pack", f"{shape.name}: search speed-up with --pack {k}", seq / pk, "x",
                "wall time one after another / packed; the per-run final evaluation (plots) is not packed")
        quiet = median(walls["quiet"])
        res.add("pack", f"{shape.name}: the same search with --pack {k} --no-plots", quiet, "s",
                "scores and per-cell tables logged, no plots")
        res.add("pack", f"{shape.name}: search speed-up with --pack {k} --no-plots", seq / quiet, "x",
                "against one after another with plots (the default)")
