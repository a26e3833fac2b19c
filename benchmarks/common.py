"""What every benchmark section shares: the table of results, the machine, timing helpers, the synthetic
workload of one shape, MLflow stores (a sqlite file or a local `mlflow server`) and the Markdown file.

The sections themselves live in throughput.py (1 and 4), memory.py (2), expand.py (3), pack.py (5) and
adaptive.py (6); run.py is the command that runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The sections in the order of the table: `--only` takes the keys, the table shows the titles. run.py's RUNNERS
# says which module runs each.
SECTIONS = {
    "throughput": "1 training throughput",
    "memory": "2 peak memory",
    "expand": "3 expand and render",
    "logging": "4 MLflow logging",
    "pack": "5 packing",
    "adaptive": "6 adaptive search",
    "analysis": "7 analysis after training",
}
# Sections that run only when `--only` names them: the adaptive section trains about 120 runs (about 20 minutes on
# 2 cores), as long as all the others together, the analysis section a few models; tests/test_benchmarks.py
# expects sections 1 to 5 only.
OPT_IN = ("adaptive", "analysis")
READING_MARKER = "<!-- reading: text below this line is kept when the file is written again -->"
N_CELLS = 5


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


# A section's code: fills the table from the parsed command line, in a temporary folder, on a device ("cpu", "cuda").
Runner = Callable[[Results, argparse.Namespace, Path, str], None]


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
# machine and timing


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


def _time_call(f: Callable[[], Any]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _timed_cmd(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> float:
    """Wall time of a subprocess (stdout discarded); an exit status not in `ok` raises with the end of stderr."""
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if p.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt


# ---------------------------------------------------------------------------------------------------------------
# the workload of one shape (sections 1, 4 and 5)


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


class Workload:
    """One shape: a synthetic recording and the config every side trains with (sections 1, 4 and 5)."""

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
                              val_frac=self.cfg["val_frac"], val_size=self.cfg["val_size"], device=self.device)
        self.n_train = len(self.data.train)


# ---------------------------------------------------------------------------------------------------------------
# MLflow stores


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


def _prepare_store(uri: str, exp_names: list[str], artifacts: Path) -> None:
    """Create the experiments with their artifacts in the temporary folder (and the store's tables)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for name in exp_names:
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(artifacts / name).as_uri())


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


# ---------------------------------------------------------------------------------------------------------------
# the Markdown file


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
