"""Sections 1 (training throughput) and 4 (MLflow logging): a plain PyTorch loop as the reference, the Trainer's
epoch, window gathering alone, and end-to-end runs of the `retina-trainer search` path timed from inside; section 4
reads its figures from the same end-to-end runs (and from runs logged to a local `mlflow server`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Results,
    Shape,
    Workload,
    _prepare_store,
    _sync,
    median,
    mlflow_server,
    shapes,
    tracking_uri,
)

GOAL_RATIO = 0.9  # end-to-end samples/s at least 0.9x the reference loop


# ---------------------------------------------------------------------------------------------------------------
# timing run_search from inside


class EpochStats:
    """Per-epoch timings collected from inside run_search by TimedTrainer and TimedReporter."""

    KEYS = ("epoch", "train", "score", "score_test", "checkpoint", "mlflow_metrics", "mlflow_checkpoints",
            "n_metrics")

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.current: dict[str, float] | None = None
        self.start = 0.0
        self.load_s = 0.0
        self.eval_s = 0.0

    def begin(self) -> None:
        self.current = {k: 0.0 for k in self.KEYS}
        self.start = time.perf_counter()

    def add(self, key: str, seconds: float) -> None:
        if self.current is not None:
            self.current[key] += seconds

    def end(self) -> None:
        if self.current is not None:
            self.current["epoch"] = time.perf_counter() - self.start
            self.epochs.append(self.current)
            self.current = None


class TimedReporter:
    """Wraps the Trainer's reporter (MLflow's RunLog) and times each call; the epoch ends with `epoch`."""

    def __init__(self, inner: Any, stats: EpochStats):
        self.inner, self.stats = inner, stats

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        t = time.perf_counter()
        self.inner.epoch(epoch, metrics)
        self.stats.add("mlflow_metrics", time.perf_counter() - t)
        self.stats.add("n_metrics", len(metrics))
        self.stats.end()  # fit's loop iteration: _epoch -> checkpoint -> reporter.epoch (-> on_epoch, no work)

    def checkpoint(self, path: Path, name: str) -> None:
        t = time.perf_counter()
        self.inner.checkpoint(path, name)
        self.stats.add("mlflow_checkpoints", time.perf_counter() - t)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def timed_launch(stats: EpochStats) -> Iterator[None]:
    """Patch trainer.launch.local for the duration: its Trainer, load_data and _evaluate_best are timed.
    Nothing changes what they do; the wrappers only read the clock (and synchronise CUDA around the loop)."""
    from trainer.launch import local

    base, load, evaluate = local.Trainer, local.load_data, local._evaluate_best

    class TimedTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any):
            super().__init__(*a, **kw)
            self.reporter = TimedReporter(self.reporter, stats)
            name = self.cfg["train_loop"]
            loop = self.loops[name]

            def timed_loop(epoch: int) -> dict[str, float]:
                t = time.perf_counter()
                out = loop(epoch)
                _sync(self.device)
                stats.add("train", time.perf_counter() - t)
                return out

            self.loops[name] = timed_loop

        def _epoch(self, epoch: int) -> dict[str, float]:
            stats.begin()
            return super()._epoch(epoch)

        def predict(self, windows: Any) -> Any:  # scoring an epoch = predict + score_outputs (cheap)
            t = time.perf_counter()
            out = super().predict(windows)
            _sync(self.device)
            stats.add("score", time.perf_counter() - t)
            if windows is self.data.test:
                stats.add("score_test", time.perf_counter() - t)
            return out

        def _checkpoint(self, *a: Any, **kw: Any) -> None:
            t = time.perf_counter()
            super()._checkpoint(*a, **kw)
            stats.add("checkpoint", time.perf_counter() - t)

    def timed_load(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = load(*a, **kw)
        stats.load_s += time.perf_counter() - t
        return out

    def timed_evaluate(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = evaluate(*a, **kw)
        stats.eval_s += time.perf_counter() - t
        return out

    local.Trainer, local.load_data, local._evaluate_best = TimedTrainer, timed_load, timed_evaluate
    try:
        yield
    finally:
        local.Trainer, local.load_data, local._evaluate_best = base, load, evaluate


class ThroughputWorkload(Workload):
    """A Workload with the three sides: the reference loop, the Trainer epoch and the end-to-end run."""

    def __init__(self, shape: Shape, tmp: Path, device: str):
        super().__init__(shape, tmp, device)
        self.n_runs = 0

    # -- the plain PyTorch reference: dense float32 windows, X[i:i+bs], Adam, PoissonNLLLoss ------------------------
    def setup_reference(self) -> str:
        import torch

        from trainer.models import build_model

        per_sample = self.shape.history * self.shape.size ** 2 * 4
        if self.device.type == "cuda":
            room = torch.cuda.mem_get_info()[0] // 2
        else:
            room = _mem_available() // 3
        n = min(self.n_train, max(self.shape.batch_size, room // per_sample))
        chunks, ys = [], []
        idx = torch.arange(n, device=self.device)
        for i in range(0, n, 4096):
            x, y = self.data.train.get(idx[i:i + 4096])
            chunks.append(x)
            ys.append(y)
        self.X = torch.cat(chunks)
        self.Y = torch.cat(ys)
        del chunks, ys
        self.n_ref = n
        torch.manual_seed(1)
        self.ref_model = build_model(self.cfg, self.data.n_cells).to(self.device)
        self.ref_opt = torch.optim.Adam(self.ref_model.parameters(), lr=self.cfg["lr"], weight_decay=self.cfg["l2"])
        self.ref_loss = torch.nn.PoissonNLLLoss(log_input=self.cfg["log_poisson"])
        return f"{n} of {self.n_train} samples held dense ({self.X.numel() * 4 / 2**20:.0f} MiB)"

    def reference_epoch(self) -> float:
        """Samples/s of one pass of the minimal loop."""
        import torch

        model, opt, loss_fn, X, Y, bs = (self.ref_model, self.ref_opt, self.ref_loss, self.X, self.Y,
                                         self.shape.batch_size)
        model.train()
        total = torch.zeros((), device=self.device)
        _sync(self.device)
        t = time.perf_counter()
        for i in range(0, self.n_ref, bs):
            x, y = X[i:i + bs], Y[i:i + bs]
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        total.item()
        _sync(self.device)
        return self.n_ref / (time.perf_counter() - t)

    # -- retina-trainer's Trainer, NullReporter: data gathering + loop -----------------------------------------------
    def setup_trainer(self) -> None:
        import torch

        from trainer.models import build_model
        from trainer.training.trainer import NullReporter, Trainer

        torch.manual_seed(2)
        model = build_model(self.cfg, self.data.n_cells)
        self.trainer = Trainer(model, self.data, self.cfg, self.tmp / "trainer-run", self.device, NullReporter())
        self.trainer_epochs = 0

    def trainer_epoch(self) -> float:
        self.trainer_epochs += 1
        _sync(self.device)
        t = time.perf_counter()
        self.trainer.loops[self.cfg["train_loop"]](self.trainer_epochs)
        _sync(self.device)
        return self.n_train / (time.perf_counter() - t)

    def gather_epoch(self) -> float:
        """Samples/s of WindowSet.batches alone (shuffled, as the Trainer draws them): the data path's share."""
        import torch

        gen = torch.Generator().manual_seed(3)
        _sync(self.device)
        t = time.perf_counter()
        for x, _ in self.data.train.batches(self.shape.batch_size, shuffle=True, generator=gen):
            pass
        _sync(self.device)
        return self.n_train / (time.perf_counter() - t)

    # -- the `retina-trainer search` path on one run --------------------------------------------------------------
    def e2e_run(self, uri: str, n_epochs: int) -> dict[str, Any]:
        """One search of one run (a new seed each time, so it is a new MLflow run), timed from inside."""
        from trainer.launch.local import run_search
        from trainer.search import expand

        self.n_runs += 1
        hp = dict(self.hp, n_epochs=n_epochs, seed=1000 + self.n_runs)
        hp_file = self.tmp / f"hp-{self.n_runs}.json"
        hp_file.write_text(json.dumps(hp))
        search = expand(hp_file)
        stats = EpochStats()
        messages: list[str] = []
        # MLflow prints "View run ..." links to stdout when a run on a server ends: keep stdout for the table
        with tracking_uri(uri), timed_launch(stats), contextlib.redirect_stdout(sys.stderr):
            t = time.perf_counter()
            outcome = run_search(search, echo=messages.append, progress=False, files={"hyperparams.json": hp})
            wall = time.perf_counter() - t
        status = outcome.runs[0].status
        if status != "FINISHED":
            raise RuntimeError(f"benchmark run ended {status}: {outcome.runs[0].error}\n" + "\n".join(messages))
        if len(stats.epochs) != n_epochs:
            raise RuntimeError(f"timed {len(stats.epochs)} epochs of {n_epochs}")
        epochs_s = sum(e["epoch"] for e in stats.epochs)
        return {"wall": wall, "epochs": stats.epochs, "load": stats.load_s, "eval": stats.eval_s,
                "epoch_sps": n_epochs * self.n_train / epochs_s, "run_sps": n_epochs * self.n_train / wall}


def _mem_available() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 4 << 30


# ---------------------------------------------------------------------------------------------------------------
# 1: training throughput


def bench_throughput(res: Results, args: argparse.Namespace, tmp: Path, device: str,
                     logging_epochs: dict[str, list[dict[str, float]]]) -> None:
    cuda = device.startswith("cuda")
    for shape in shapes(args, cuda):
        folder = tmp / f"throughput-{shape.name}"
        folder.mkdir()
        w = ThroughputWorkload(shape, folder, device)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        _prepare_store(uri, [w.hp["exp_name"]], folder / "artifacts")
        dense = w.setup_reference()
        w.setup_trainer()
        full_cpu = shape.name == "full" and not cuda  # seconds per epoch even at a few hundred samples
        reps = max(2, args.reps - 1) if full_cpu else args.reps
        epochs = min(args.epochs, 2) if full_cpu else args.epochs
        print(f"{shape.label()}: {w.n_train} training samples, {reps} repetitions; {dense}", file=sys.stderr)
        # warm-up of every side (allocator, first MLflow run in the store, plotting imports): not measured
        w.reference_epoch()
        w.trainer_epoch()
        w.gather_epoch()
        w.e2e_run(uri, 1)
        # Each measured side is bracketed by reference epochs, R T G R E R T G R E R ..., and compared with the
        # reference speed around it (the mean of the two epochs' times), so that a change of load between the
        # sides moves both the side and its reference.
        ref, trn, gat, e2e = [w.reference_epoch()], [], [], []
        for r in range(reps):
            trn.append(w.trainer_epoch())
            gat.append(w.gather_epoch())
            ref.append(w.reference_epoch())
            e2e.append(w.e2e_run(uri, epochs))
            ref.append(w.reference_epoch())
            print(f"  rep {r + 1}/{reps}: ref {ref[-3]:.0f} / {ref[-2]:.0f} / {ref[-1]:.0f}, trainer {trn[-1]:.0f}, "
                  f"e2e epoch {e2e[-1]['epoch_sps']:.0f}, e2e run {e2e[-1]['run_sps']:.0f} samples/s",
                  file=sys.stderr)

        def around(k: int) -> float:  # reference samples/s over the two epochs around position k
            return 2 / (1 / ref[k] + 1 / ref[k + 1])

        name = shape.name
        note = (f"{shape.label()}; {w.n_train} samples/epoch; median of {len(ref)} epochs, one before and after "
                f"each measured side")
        r_trn = median([t / around(2 * k) for k, t in enumerate(trn)])
        r_ep = median([e["epoch_sps"] / around(2 * k + 1) for k, e in enumerate(e2e)])
        r_run = median([e["run_sps"] / around(2 * k + 1) for k, e in enumerate(e2e)])
        res.add("throughput", f"{name}: reference loop (dense float32 windows)", median(ref), "samples/s", note)
        res.add("throughput", f"{name}: Trainer epoch, NullReporter (gather + loop)", median(trn), "samples/s",
                "shuffled batches gathered from the uint8 stimulus")
        res.add("throughput", f"{name}: ratio Trainer epoch / reference", r_trn, "x",
                f"median of {reps} ratios, each to the reference epochs around it; goal >= 0.9")
        res.add("throughput", f"{name}: end-to-end per epoch (search path, sqlite MLflow)", median(
            [e["epoch_sps"] for e in e2e]), "samples/s",
                f"train + val/test scoring + checkpoints + MLflow logging; {epochs} epochs per run")
        res.add("throughput", f"{name}: ratio end-to-end epoch / reference", r_ep, "x", "goal >= 0.9")
        res.add("throughput", f"{name}: end-to-end whole run", median([e["run_sps"] for e in e2e]), "samples/s",
                "epochs x samples / wall time of run_search incl. data load, MLflow setup, final evaluation")
        res.add("throughput", f"{name}: ratio end-to-end whole run / reference", r_run, "x",
                f"a {epochs}-epoch run; the fixed costs shrink with more epochs")
        all_epochs = [ep for e in e2e for ep in e["epochs"]]
        ep_s = median([ep["epoch"] for ep in all_epochs])
        res.add("throughput", f"{name}: window gathering alone (WindowSet.batches)", median(gat), "samples/s",
                f"{median([t / g for t, g in zip(trn, gat)]) * 100:.1f}% of the Trainer epoch")
        res.add("throughput", f"{name}: val + test scoring share of an end-to-end epoch",
                100 * median([ep["score"] / ep["epoch"] for ep in all_epochs]), "%",
                f"{len(w.data.val)} val + {len(w.data.test)} test samples, scored in batches of min(batch_size, 256); "
                f"the test split's part {100 * median([ep['score_test'] / ep['epoch'] for ep in all_epochs]):.1f}%")
        res.add("throughput", f"{name}: fixed cost per run (load, MLflow setup, final evaluation)",
                median([e["wall"] - sum(ep["epoch"] for ep in e["epochs"]) for e in e2e]), "s",
                f"data load {median([e['load'] for e in e2e]):.2f} s, final evaluation + plots "
                f"{median([e['eval'] for e in e2e]):.2f} s; median epoch {ep_s:.2f} s")
        for label, ok in ((f"{name} Trainer epoch", r_trn), (f"{name} end-to-end epoch (the issue's figure)", r_ep),
                          (f"{name} end-to-end whole {epochs}-epoch run", r_run)):
            res.goal(f"{label} / reference = {ok:.2f}x: {'met' if ok >= GOAL_RATIO else 'missed'} "
                     f"(goal >= {GOAL_RATIO})")
        logging_epochs[f"{name}, sqlite store"] = all_epochs
        if name != "full" and not args.quick and not args.no_server:
            logging_epochs[f"{name}, mlflow server"] = bench_server(w, folder, epochs, reps)
        del w


def bench_server(w: ThroughputWorkload, folder: Path, epochs: int, reps: int) -> list[dict[str, float]]:
    """The same runs logged to a local `mlflow server` (sqlite backend, proxied artifacts) started here."""
    with mlflow_server(folder / "server") as uri:
        if uri is None:
            return []
        w.e2e_run(uri, 1)  # warm-up: experiment creation
        out = []
        for _ in range(max(1, reps - 2)):
            out.extend(w.e2e_run(uri, epochs)["epochs"])
        return out


# ---------------------------------------------------------------------------------------------------------------
# 4: MLflow logging


def report_logging(res: Results, logging_epochs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    for where, epochs in logging_epochs.items():
        if not epochs:
            res.add("logging", f"{where}: MLflow time per epoch", None, "ms", "the server did not start")
            continue
        m = median([e["mlflow_metrics"] for e in epochs])
        c = median([e["mlflow_checkpoints"] for e in epochs])
        mlf = [e["mlflow_metrics"] + e["mlflow_checkpoints"] for e in epochs]
        res.add("logging", f"{where}: log_batch of the epoch's metrics", 1000 * m, "ms",
                f"{median([e['n_metrics'] for e in epochs]):.0f} metrics per epoch; median of {len(epochs)} epochs")
        res.add("logging", f"{where}: checkpoint uploads (latest.pt, best.pt)", 1000 * c, "ms",
                "per epoch; best.pt only when validation r improved")
        res.add("logging", f"{where}: local checkpoint writes (torch.save)",
                1000 * median([e["checkpoint"] - e["mlflow_checkpoints"] for e in epochs]), "ms", "per epoch")
        res.add("logging", f"{where}: MLflow time / epoch training time",
                100 * median([x / e["train"] for x, e in zip(mlf, epochs)]), "%",
                f"training loop median {median([e['train'] for e in epochs]):.2f} s")
        res.add("logging", f"{where}: MLflow time / whole epoch", 100 * median([x / e["epoch"] for x, e in
                                                                                 zip(mlf, epochs)]), "%",
                f"whole epoch median {median([e['epoch'] for e in epochs]):.2f} s")
    if args.quick or args.no_server:
        res.add("logging", "mlflow server", None, "ms", "skipped with --quick / --no-server")


# ---------------------------------------------------------------------------------------------------------------
# the runner of sections 1 and 4



def bench_throughput_and_logging(res: Results, args: argparse.Namespace, tmp: Path, device: str) -> None:
    """Section 4 reads the epochs that section 1's end-to-end runs timed: one runner for both."""
    logging_epochs: dict[str, list[dict[str, float]]] = {}
    bench_throughput(res, args, tmp, device, logging_epochs)
    report_logging(res, logging_epochs, args)
