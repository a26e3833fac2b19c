"""Shared fixtures: the seed README's keys, a synthetic recording, a real MLflow server on localhost."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED_README = ROOT.parent / "shared" / "seed" / "torchdeepretina-training-readme.md"

# Tiny models train far faster on one thread than on two competing ones (measured ~20x per step here); the
# end-to-end tests' subprocesses keep torch's default.
torch.set_num_threads(1)

# The analyses after training (a few seconds per run) are off in the CLI subprocesses of the tests about other
# things, which inherit this environment; the tests of the analyses turn them on (`search --analysis`).
os.environ["RETINA_ANALYSIS"] = "false"

# Small shapes: every test trains in seconds on 2 CPU cores.
# log_poisson set, as a real config sets it: a Poisson search that leaves it unset is warned (test_config.py), and
# the tests that read a command's output line by line expect no warning there.
SMALL = {"img_shape": [10, 12, 12], "chans": [4, 4], "ksizes": [5, 3, 3], "batch_size": 128, "log_poisson": False}


class ListReporter:
    """A Trainer reporter that keeps what it is told: (epoch, metrics) and (file name, artifact name) pairs."""

    def __init__(self):
        self.epochs, self.checkpoints = [], []

    def epoch(self, epoch, metrics):
        self.epochs.append((epoch, dict(metrics)))

    def checkpoint(self, path, name):
        self.checkpoints.append((path.name, name))


@pytest.fixture(scope="session")
def seed_readme_keys() -> list[str]:
    if not SEED_README.exists():
        pytest.skip(f"seed README not present at {SEED_README}")
    return re.findall(r"^\* `(\w+)`:", SEED_README.read_text(), flags=re.M)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root holding synth01/whitenoise.h5: 3 cells, 12x12 frames, a short recording."""
    from trainer.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, "synth01", "whitenoise", n_cells=3, size=12, train_frames=3000, test_frames=600,
                    n_repeats=4, history=10, seed=0)
    return root


def pytest_collection_modifyitems(config, items):
    """Start the slowest tests first: with two workers (./run-tests.sh runs pytest -n 2) the short ones then fill
    the gaps and both workers finish together, instead of one idling while the other runs a long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# How long a test waits for something that takes seconds on an idle machine: generous, for a loaded 2-core one; a
# wait that runs out fails loudly, naming what it waited for.
PATIENCE_S = 600.0


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, seconds: float = PATIENCE_S,
               every: float = 0.2):
    """Poll `condition()` until it returns something truthy, and return that. Fails (AssertionError) when `proc`,
    the process expected to bring it about, has exited (its stderr's end in the message), or after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        got = condition()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None and not proc.stderr.closed else ""
            raise AssertionError(f"waiting for {what}: the process exited ({proc.returncode}) first: {err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: not within {seconds:.0f} s")
        time.sleep(every)


class LineReader:
    """The lines a process writes to one of its pipes, read by a thread, so that a wait for a line never blocks
    past its bound (a blocking readline() would)."""

    def __init__(self, stream):
        import queue
        import threading

        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, seconds: float = PATIENCE_S) -> list[str]:
        """Read lines until one holds `text`; every line read so far. Fails when the stream ends or time runs out."""
        import queue

        deadline = time.monotonic() + seconds
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"'{text}' not seen within {seconds:.0f} s: {''.join(self.lines)[-3000:]}")
            if line is None:
                raise AssertionError(f"the stream ended before '{text}': {''.join(self.lines)[-3000:]}")
            self.lines.append(line)
            if text in line:
                return self.lines

    def rest(self) -> str:
        """Everything after the lines read, once the stream has ended (the process exited)."""
        self._thread.join(timeout=PATIENCE_S)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


class Outcome:
    """What a command ended with: its exit status and what it wrote (the fields of subprocess.CompletedProcess)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def invoke(args: list[str], cwd: Path | str, tracking_uri: str | None = None,
           env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> Outcome:
    """`retina-trainer ARGS` run in this process by Click's runner, in `cwd`: what `python -m trainer ARGS` does,
    without the new process's 10 s of imports. MLFLOW_TRACKING_URI is `tracking_uri` (the other MLFLOW_ variables
    of this process removed, as a fresh process would not have them), `env` is added and the variables whose names
    start with one of `unset` removed. For the tests where the process boundary is not what is tested (signals,
    kill -9 and two processes are: they start real processes). An exception the CLI did not turn into an error
    line is written to stderr as a traceback, as Python would.

    The tracking URI must name a server or an absolute path: MLflow caches its stores by URI for the life of the
    process, so a relative `sqlite:///mlflow.db` would reach the first folder's store from every folder (with no
    URI, MLflow's default is the absolute path of `cwd`/mlflow.db)."""
    import signal as signal_module
    import traceback

    import mlflow
    from click.testing import CliRunner

    import trainer.tracking  # noqa: F401  (its MLflow settings, set on first import, are then in the saved env)
    from trainer.cli import main, seed_form

    if tracking_uri is not None and tracking_uri.startswith("sqlite:///") and \
            not Path(tracking_uri[len("sqlite:///"):]).is_absolute():
        raise ValueError(f"invoke needs an absolute SQLite path, not {tracking_uri}")
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_sigterm = signal_module.getsignal(signal_module.SIGTERM)
    for key in [k for k in os.environ if k.startswith("MLFLOW_") and not k.startswith(KEPT_MLFLOW_ENV)]:
        del os.environ[key]
    for key in [k for k in os.environ if unset and k.startswith(unset)]:
        del os.environ[key]
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, seed_form(list(args)), prog_name="retina-trainer")
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        signal_module.signal(signal_module.SIGTERM, saved_sigterm)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return Outcome(result.exit_code, result.stdout, stderr)


# The MLflow settings that retina-trainer sets for its own process when it starts (trainer/tracking.py: short HTTP
# retries, no progress bars): kept by invoke, since in this process they were set once, at import.
KEPT_MLFLOW_ENV = ("MLFLOW_HTTP_REQUEST_", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` (SQLite backend in `folder`, proxied artifacts) on localhost; (process, uri)."""
    port = port or _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(folder / "server.log", "a")
    # no job workers (MLflow's background jobs, which no test uses): half the start-up time and ~1 GB less memory
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    wait_healthy(proc, uri, folder / "server.log", 120)
    return proc, uri


def wait_healthy(proc: subprocess.Popen, uri: str, log: Path, seconds: float) -> None:
    """Wait until the server at `uri` answers /health; stop it and raise with its log's end if it does not."""
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError(f"the mlflow server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server started by start_mlflow_server, with its worker processes (SIGKILL: as a crash)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, proxied artifacts) on localhost for the whole test session."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_mlflow_server(proc)
