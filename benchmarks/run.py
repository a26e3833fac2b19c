"""Benchmarks of retina-trainer: training throughput against a plain PyTorch loop, peak memory on a long
recording, expansion and rendering of a 1,000-run search, and the cost of MLflow logging per epoch.

    .venv/bin/python benchmarks/run.py                         # small shape on CPU (CUDA when present)
    .venv/bin/python benchmarks/run.py --quick                 # fewer repetitions, no memory section
    .venv/bin/python benchmarks/run.py --full-shape            # adds the real 40x50x50 BNCNN
    .venv/bin/python benchmarks/run.py --out benchmarks/RESULTS.md

Every speed figure is a ratio against a reference measured in the same process and run, with the two sides
alternating (A B, B A, ...) and the median taken, so that load from other processes affects both sides. Figures
are printed as one Markdown table; `--out` writes it with the machine, the date and the command; `--json` writes
the rows for programs. See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SECTIONS = {
    "throughput": "1 training throughput",
    "memory": "2 peak memory",
    "expand": "3 expand and render",
    "logging": "4 MLflow logging",
    "pack": "5 packing",
}
READING_MARKER = "<!-- reading: text below this line is kept when the file is written again -->"
N_CELLS = 5
GOAL_RATIO = 0.9  # end-to-end samples/s at least 0.9x the reference loop
GOAL_RSS = 2.0  # peak RSS under 2x the uint8 stimulus size
GOAL_PACK = 3.0  # on a GPU, a pack of 32 at least 3x the model-samples/s of a sequential search


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass
class Row:
    """One figure of the table; value None means skipped (the note says why)."""

    section: str
    measure: str
    value: float | None
    unit: str
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    goals: list[str] = field(default_factory=list)

    def add(self, section: str, measure: str, value: float | None, unit: str, note: str = "") -> None:
        self.rows.append(Row(SECTIONS[section], measure, value, unit, note))
        shown = "skipped" if value is None else _fmt(value)
        print(f"  [{SECTIONS[section]}] {measure}: {shown} {unit} {note}".rstrip(), file=sys.stderr, flush=True)

    def goal(self, text: str) -> None:
        self.goals.append(text)

    def table(self) -> str:
        lines = ["| section | measure | value | unit | note |", "|---|---|---:|---|---|"]
        for r in self.rows:
            value = "skipped" if r.value is None else _fmt(r.value)
            lines.append(f"| {r.section} | {r.measure} | {value} | {r.unit} | {r.note} |")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.1:
        return f"{v:.3f}"
    return f"{v:.3g}"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


# ---------------------------------------------------------------------------------------------------------------
# machine


def machine(device: str) -> dict[str, str]:
    """What the figures were measured on."""
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "python": platform.python_version(),
            "torch": torch.__version__, "torch threads": str(torch.get_num_threads()), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    with contextlib.suppress(OSError):
        info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# 1 + 4: training throughput and MLflow logging


@dataclass(frozen=True)
class Shape:
    name: str
    history: int
    size: int
    chans: tuple[int, int]
    ksizes: tuple[int, int, int]
    batch_size: int
    train_frames: int
    test_frames: int

    @property
    def img_shape(self) -> list[int]:
        return [self.history, self.size, self.size]

    def label(self) -> str:
        return (f"{self.name} {self.history}x{self.size}x{self.size}, chans {list(self.chans)}, "
                f"ksizes {list(self.ksizes)}, batch {self.batch_size}")


def shapes(args: argparse.Namespace, cuda: bool) -> list[Shape]:
    # test frames are a tenth of the training frames, as in `retina-trainer data synth`'s default recording
    if args.tiny:
        frames = 3000 if args.quick else 6000
        out = [Shape("tiny", 10, 12, (4, 4), (5, 3, 3), 128, frames, frames // 10)]
    else:
        frames = 6000 if args.quick else 20000
        out = [Shape("small", 20, 20, (8, 8), (9, 7, 7), 256, frames, frames // 10)]
    if args.full_shape:  # the default BNCNN; a few hundred samples on CPU, the real benchmark on a GPU
        if cuda:
            out.append(Shape("full", 40, 50, (8, 8), (15, 11, 11), 512, 20000, 2000))
        else:
            frames = args.full_frames
            out.append(Shape("full", 40, 50, (8, 8), (15, 11, 11), 64, frames, 40 + max(10, (frames - 40) // 10)))
    return out


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


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


class Workload:
    """One shape: a synthetic recording, the config every side trains with, and the three sides."""

    def __init__(self, shape: Shape, tmp: Path, device: str):
        import torch

        from trainer.data.recording import load_data
        from trainer.data.synth import write_synthetic
        from trainer.search import expand

        self.shape, self.tmp, self.device = shape, tmp, torch.device(device)
        self.data_root = tmp / "data"
        self.path = write_synthetic(self.data_root, f"bench_{shape.name}", "whitenoise", n_cells=N_CELLS,
                                    size=shape.size, train_frames=shape.train_frames,
                                    test_frames=shape.test_frames, n_repeats=5, history=shape.history, seed=0)
        self.hp = {"exp_name": f"bench_{shape.name}", "dataset": f"bench_{shape.name}",
                   "stim_type": "whitenoise", "data_root": str(self.data_root), "save_root": str(tmp / "runs"),
                   "img_shape": shape.img_shape, "chans": list(shape.chans), "ksizes": list(shape.ksizes),
                   "batch_size": shape.batch_size, "early_stopping": 0, "device": device}
        hp_file = tmp / "hp.json"
        hp_file.write_text(json.dumps(self.hp))
        self.cfg = expand(hp_file).runs[0].config
        self.data = load_data(self.path, cells=self.cfg["cells"], img_shape=self.cfg["img_shape"],
                              val_frac=self.cfg["val_frac"], device=self.device)
        self.n_train = len(self.data.train)
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


def _prepare_store(uri: str, exp_names: list[str], artifacts: Path) -> None:
    """Create the experiments with their artifacts in the temporary folder (and the store's tables)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for name in exp_names:
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(artifacts / name).as_uri())


def bench_throughput(res: Results, args: argparse.Namespace, tmp: Path, device: str,
                     logging_epochs: dict[str, list[dict[str, float]]]) -> None:
    cuda = device.startswith("cuda")
    for shape in shapes(args, cuda):
        folder = tmp / f"throughput-{shape.name}"
        folder.mkdir()
        w = Workload(shape, folder, device)
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


def bench_server(w: Workload, folder: Path, epochs: int, reps: int) -> list[dict[str, float]]:
    """The same runs logged to a local `mlflow server` (sqlite backend, proxied artifacts) started here."""
    with mlflow_server(folder / "server") as uri:
        if uri is None:
            return []
        w.e2e_run(uri, 1)  # warm-up: experiment creation
        out = []
        for _ in range(max(1, reps - 2)):
            out.extend(w.e2e_run(uri, epochs)["epochs"])
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str | None]:
    """A local `mlflow server` on a free port; stopped by its pid (its process group) at the end."""
    folder.mkdir(parents=True)
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                print(f"mlflow server did not start: {(folder / 'server.log').read_text()[-1000:]}",
                      file=sys.stderr)
                yield None
                return
            time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


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
# 2: peak memory in a fresh process


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def memory_child(path: str, batches: int, batch_size: int, big_batch: int, run_dir: str) -> None:
    """Run in a fresh interpreter: import torch (the baseline), load the recording, then through the Trainer's own
    methods: one epoch of `batches` shuffled batches drawn from the whole training split, one step at the default
    batch size `big_batch`, and the validation and test scoring of an epoch (one scoring batch each); print JSON
    with the peak RSS (VmHWM) after each phase."""
    import torch

    base = _proc_status()
    import dataclasses

    from trainer import config
    from trainer.data.recording import WindowSet, load_data
    from trainer.models import build_model
    from trainer.training.trainer import NullReporter, Trainer, resolve_device, score_batch

    imports = _proc_status()
    device = resolve_device("auto")
    t = time.perf_counter()
    data = load_data(path, img_shape=[40, 50, 50], val_frac=0.1, device=device)
    load_s = time.perf_counter() - t
    loaded = _proc_status()
    stim_bytes = sum(ws.stimulus.numel() * ws.stimulus.element_size() for ws in (data.train, data.test))
    gen = torch.Generator().manual_seed(0)
    n = min(len(data.train), batches * batch_size)

    def subset(ws: WindowSet, idx: torch.Tensor) -> WindowSet:  # shares the stimulus: no frames are copied
        return WindowSet(ws.stimulus, ws.rates, ws.starts[idx.to(ws.starts.device)], ws.history, ws.mean, ws.std)

    cfg = config.resolve({"img_shape": [40, 50, 50], "batch_size": batch_size, "n_epochs": 1, "early_stopping": 0})
    score_n = big_batch or batch_size  # samples scored per split: one training batch's worth
    small = dataclasses.replace(
        data, train=subset(data.train, torch.randperm(len(data.train), generator=gen)[:n]),
        val=subset(data.val, torch.arange(min(score_n, len(data.val)))),
        test=subset(data.test, torch.arange(min(score_n, len(data.test)))))
    torch.manual_seed(0)
    trainer = Trainer(build_model(cfg, data.n_cells), small, cfg, Path(run_dir), device, NullReporter())
    out: dict[str, Any] = {"baseline_torch": base["VmHWM"], "after_imports": imports["VmHWM"],
                           "after_load_rss": loaded["VmRSS"], "after_load_hwm": loaded["VmHWM"], "load_s": load_s,
                           "stimulus_bytes": stim_bytes, "train_frames": data.train.stimulus.shape[0],
                           "test_frames": data.test.stimulus.shape[0], "samples_trained": n,
                           "batch_size": batch_size, "big_batch": big_batch,
                           "scored": len(small.val) + len(small.test), "device": str(device)}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def phase(name: str, f: Callable[[], Any]) -> None:
        t = time.perf_counter()
        f()
        _sync(device)
        out[f"{name}_s"] = time.perf_counter() - t
        out[f"{name}_hwm"] = _proc_status()["VmHWM"]
        if cuda:
            out[f"{name}_gpu"] = torch.cuda.max_memory_allocated()

    loop = trainer.loops[cfg["train_loop"]]
    phase("train", lambda: loop(1))
    if big_batch:
        trainer.cfg = dict(cfg, batch_size=big_batch)
        trainer.data = dataclasses.replace(small, train=subset(data.train, torch.randperm(
            len(data.train), generator=gen)[:big_batch]))
        phase("big", lambda: loop(2))
    out["score_batch"] = score_batch(trainer.cfg)  # Trainer.predict's batches: min(batch_size, SCORE_BATCH)
    phase("score", lambda: (trainer.score(trainer.data.val), trainer.score(trainer.data.test)))
    out["peak_rss"] = _proc_status()["VmHWM"]
    if cuda:
        out["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


def bench_memory(res: Results, args: argparse.Namespace, tmp: Path) -> None:
    if args.quick:
        res.add("memory", "peak RSS, 360,000-frame 50x50 recording", None, "GiB", "skipped with --quick")
        return
    folder = tmp / "memory"
    folder.mkdir()
    frames = args.mem_frames
    t = time.perf_counter()
    gen = subprocess.run([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]); from trainer.data.synth import write_synthetic; "
        "write_synthetic(sys.argv[2], 'bench_long', 'whitenoise', n_cells=5, size=50, train_frames=int(sys.argv[3]), "
        "test_frames=6000, n_repeats=5, history=40, seed=0)"), str(ROOT), str(folder / "data"), str(frames)],
        capture_output=True, text=True)
    if gen.returncode != 0:
        raise RuntimeError(f"writing the long recording failed:\n{gen.stderr[-3000:]}")
    gen_s = time.perf_counter() - t
    path = folder / "data" / "bench_long" / "whitenoise.h5"
    file_bytes = path.stat().st_size
    child = subprocess.run([sys.executable, __file__, "--memory-child", str(path), "--mem-batches",
                            str(args.mem_batches), "--mem-batch-size", str(args.mem_batch_size),
                            "--mem-big-batch", str(args.mem_big_batch),
                            "--threads", str(args.threads or 0), "--run-dir", str(folder / "run")],
                           capture_output=True, text=True)
    path.unlink()  # the file is ~1 GB: gone as soon as it is read
    if child.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{child.stderr[-3000:]}")
    m = json.loads(child.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    stim = m["stimulus_bytes"]
    ratio = m["peak_rss"] / stim
    res.add("memory", "uint8 stimulus held (train + test)", stim / gib, "GiB",
            f"{m['train_frames']:,} + {m['test_frames']:,} frames of 50x50; h5 file {file_bytes / gib:.2f} GiB, "
            f"written in {gen_s:.0f} s")
    res.add("memory", "baseline RSS after `import torch`", m["baseline_torch"] / gib, "GiB", "fresh process")
    res.add("memory", "RSS after load_data", m["after_load_rss"] / gib, "GiB",
            f"peak while loading {m['after_load_hwm'] / gib:.2f} GiB; load_data took {m['load_s']:.1f} s; "
            f"trainer imports at {m['after_imports'] / gib:.2f} GiB")
    res.add("memory", "peak RSS after a training epoch of small batches", m["train_hwm"] / gib, "GiB",
            f"{m['samples_trained']:,} samples in {m['train_s']:.0f} s (batch {m['batch_size']}, shuffled over the "
            f"whole recording, full 40x50x50 BNCNN)")
    if m["big_batch"]:
        res.add("memory", f"peak RSS after one step at batch {m['big_batch']}", m["big_hwm"] / gib, "GiB",
                f"the default batch_size ({m['big_s']:.0f} s)")
    res.add("memory", "peak RSS (VmHWM) after val + test scoring", m["peak_rss"] / gib, "GiB",
            f"{m['scored']:,} samples scored in batches of {m['score_batch']} ({m['score_s']:.0f} s); "
            f"device {m['device']}")
    res.add("memory", "peak RSS / stimulus size", ratio, "x", f"goal < {GOAL_RSS}")
    res.add("memory", "peak RSS above the torch baseline / stimulus size",
            (m["peak_rss"] - m["baseline_torch"]) / stim, "x", "what the data path and training add")
    before = m["big_hwm"] if m["big_batch"] else m["train_hwm"]
    res.add("memory", "scoring's addition to the peak", (m["peak_rss"] - before) / gib, "GiB",
            f"one batch of {m['score_batch']} windows: {m['score_batch'] * 40 * 2500 / gib:.2f} GiB uint8 gathered, "
            f"{m['score_batch'] * 40 * 2500 * 4 / gib:.2f} GiB as float32, plus the convolutions' buffers")
    if "gpu_peak_allocated" in m:
        res.add("memory", "peak GPU memory allocated", m["gpu_peak_allocated"] / gib, "GiB",
                f"{m['train_gpu'] / gib:.2f} GiB after the small-batch epoch")
    res.goal(f"peak RSS {m['peak_rss'] / gib:.2f} GiB = {ratio:.2f}x the uint8 stimulus "
             f"({stim / gib:.2f} GiB): {'met' if ratio < GOAL_RSS else 'missed'} (goal < {GOAL_RSS}x)")


# ---------------------------------------------------------------------------------------------------------------
# 3: expand and render


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


def _timed_cmd(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt


def bench_expand(res: Results, args: argparse.Namespace, tmp: Path) -> None:
    from trainer.search import expand

    folder = tmp / "expand"
    folder.mkdir()
    hp = {"exp_name": "bench_expand", "n_repeats": 10}
    hr = {"lr": [round(1e-4 * 1.5 ** i, 8) for i in range(10)], "l2": [0.0] + [10.0 ** -i for i in range(1, 10)]}
    (folder / "hp.json").write_text(json.dumps(hp))
    (folder / "hr.json").write_text(json.dumps(hr))
    n_runs = len(expand(folder / "hp.json", folder / "hr.json").runs)
    exe = Path(sys.executable).with_name("retina-trainer")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainer"]
    has_k8s = subprocess.run([*cli, "k8s", "--help"], capture_output=True, text=True).returncode == 0
    render_args = ["--image", "example.org/retina-trainer:bench", "--tracking-uri", "http://mlflow.example:5000",
                   "--parent-run-id", "0123456789abcdef"]
    render_cmd = [*cli, "k8s", "render", "hp.json", "hr.json", *render_args]
    refused, render_runs = "", n_runs
    if has_k8s:
        trial = subprocess.run(render_cmd, cwd=folder, capture_output=True, text=True)
        if trial.returncode != 0:  # e.g. a ConfigMap limit: time the largest power-of-two share that renders
            refused = trial.stderr.strip().splitlines()[-1] if trial.stderr.strip() else f"exit {trial.returncode}"
            sub = folder / "render"
            sub.mkdir()
            (sub / "hr.json").write_text(json.dumps(hr))
            for repeats in (5, 2, 1):
                (sub / "hp.json").write_text(json.dumps(dict(hp, n_repeats=repeats)))
                if subprocess.run(render_cmd, cwd=sub, capture_output=True).returncode == 0:
                    render_runs = 100 * repeats
                    break
            else:
                has_k8s = False
            render_cmd = [*cli, "k8s", "render", str(sub / "hp.json"), str(sub / "hr.json"), *render_args]
    reps = max(3, args.reps + 2)
    fn, pas, exp_cli, render = [], [], [], []
    for r in range(reps):
        steps: list[Callable[[], None]] = [
            lambda: pas.append(_timed_cmd([sys.executable, "-c", "pass"], folder)),
            lambda: exp_cli.append(_timed_cmd([*cli, "expand", "hp.json", "hr.json"], folder)),
            lambda: fn.append(_time_call(lambda: expand(folder / "hp.json", folder / "hr.json")))]
        if has_k8s:
            steps.append(lambda: render.append(_timed_cmd(render_cmd, folder)))
        for step in steps if r % 2 == 0 else steps[::-1]:
            step()
    note = f"{n_runs} runs (10 lr x 10 l2 x 10 repeats); median of {reps}"
    res.add("expand", "`python -c pass` (reference)", 1000 * median(pas), "ms", "interpreter start-up")
    res.add("expand", "expand() in-process", 1000 * median(fn), "ms", note)
    res.add("expand", "`retina-trainer expand` CLI", 1000 * median(exp_cli), "ms", "subprocess, table to /dev/null")
    res.add("expand", "CLI expand / `python -c pass`", median([a / b for a, b in zip(exp_cli, pas)]), "x", "")
    if has_k8s:
        what = f"{render_runs} runs" + (f" (the {n_runs}-run search was refused: {refused})" if refused else "")
        res.add("expand", "`retina-trainer k8s render --parent-run-id X` CLI", 1000 * median(render), "ms",
                f"{what}; subprocess, YAML to /dev/null; no server contacted")
        res.add("expand", "CLI k8s render / `python -c pass`", median([a / b for a, b in zip(render, pas)]), "x", "")
        if refused:
            res.goal(f"`k8s render` of the {n_runs}-run search: refused ({refused})")
    else:
        res.add("expand", "`retina-trainer k8s render` CLI", None, "ms",
                f"skipped: {refused or '`retina-trainer k8s --help` failed (the k8s command is not there)'}")


def _time_call(f: Callable[[], Any]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------------------
# main


def write_markdown(out: Path, res: Results, info: dict[str, str], command: str, started: datetime.datetime,
                   seconds: float) -> None:
    kept = ""
    if out.exists():
        text = out.read_text()
        if READING_MARKER in text:
            kept = text.split(READING_MARKER, 1)[1]
    lines = ["# Benchmark results", "",
             f"Measured {started:%Y-%m-%d %H:%M} (local time) in {seconds / 60:.1f} minutes with", "",
             "```", command, "```", "", "## Machine", ""]
    lines += [f"* {k}: {v}" for k, v in info.items()]
    lines += ["", "## Figures", "", res.table(), "", "## Goals", ""]
    lines += [f"* {g}" for g in res.goals]
    lines += ["", READING_MARKER]
    out.write_text("\n".join(lines) + (kept if kept else "\n"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter recording, fewer repetitions, no memory section, "
                   "no mlflow server")
    p.add_argument("--tiny", action="store_true", help="the smallest shape (10x12x12), for the test suite")
    p.add_argument("--full-shape", action="store_true", help="add the default BNCNN at 40x50x50")
    p.add_argument("--full-frames", type=int, default=300, help="train frames of the full-shape recording on CPU")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions per side (default 4, quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per end-to-end run (default 3, quick 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; default 1 on CPU (see README: on a shared 2-core machine two threads were "
                        "6-8x slower and far noisier), torch's choice on CUDA; 0 = torch's choice")
    p.add_argument("--no-server", action="store_true", help="skip logging to a local mlflow server")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    p.add_argument("--mem-frames", type=int, default=360_000, help="train frames of the memory recording")
    p.add_argument("--mem-batches", type=int, default=100, help="training batches in the memory section")
    p.add_argument("--mem-batch-size", type=int, default=4, help="batch size in the memory section")
    p.add_argument("--mem-big-batch", type=int, default=512,
                   help="one extra training step at this batch size in the memory section (0: none)")
    p.add_argument("--pack-sizes", type=int, nargs="+", default=None,
                   help="pack sizes K of the packing section (default 4 8 on CPU, 4 with --quick, 8 32 on CUDA)")
    p.add_argument("--pack-precisions", nargs="+", choices=["fp32", "tf32", "bf16"], default=None,
                   help="precisions of the packing section's training pass (default fp32; fp32 bf16 on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="write the table, machine and command here (Markdown)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.threads is None and not torch.cuda.is_available():
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.mem_batches, args.mem_batch_size, args.mem_big_batch, args.run_dir)
        return 0
    args.reps = args.reps or (2 if args.quick else 4)
    args.epochs = args.epochs or (2 if args.quick else 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    info = machine(device)
    command = " ".join([".venv/bin/python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    res = Results()
    tmp = Path(tempfile.mkdtemp(prefix="retina-bench-"))
    cwd = os.getcwd()
    try:
        os.chdir(tmp)  # anything MLflow writes relative to the working directory stays in the temporary folder
        logging_epochs: dict[str, list[dict[str, float]]] = {}
        if "throughput" in args.only or "logging" in args.only:
            bench_throughput(res, args, tmp, device, logging_epochs)
            report_logging(res, logging_epochs, args)
        if "expand" in args.only:
            bench_expand(res, args, tmp)
        if "memory" in args.only:
            bench_memory(res, args, tmp)
        if "pack" in args.only:
            bench_pack(res, args, tmp, device)
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    order = list(SECTIONS.values())
    res.rows.sort(key=lambda r: order.index(r.section))  # stable: measures keep their order within a section
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print()
    print(res.table())
    print()
    print("\n".join(f"goal: {g}" for g in res.goals))
    print(f"\ntook {seconds:.0f} s")
    if args.out:
        write_markdown(args.out, res, info, command, started, seconds)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in res.rows],
                                         "goals": res.goals, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
