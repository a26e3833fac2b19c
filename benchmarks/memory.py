"""Section 2, peak memory: a long recording is written, then a fresh Python process (run.py --memory-child, which
calls memory_child) loads it and trains and scores through the Trainer's own methods, reporting its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Results, _sync

GOAL_RSS = 2.0  # peak RSS under 2x the uint8 stimulus size
RUN = Path(__file__).resolve().with_name("run.py")  # the command the child process runs, with --memory-child


# ---------------------------------------------------------------------------------------------------------------
# in the fresh process


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
    from trainer.data.recording import load_data
    from trainer.data.windows import WindowSet
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


# ---------------------------------------------------------------------------------------------------------------
# in the benchmark's process


def bench_memory(res: Results, args: argparse.Namespace, tmp: Path, device: str) -> None:
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
    child = subprocess.run([sys.executable, str(RUN), "--memory-child", str(path), "--mem-batches",
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
