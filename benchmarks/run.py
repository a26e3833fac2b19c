"""Benchmarks of retina-trainer: training throughput against a plain PyTorch loop, peak memory on a long
recording, expansion and rendering of a 1,000-run search, the cost of MLflow logging per epoch, packed runs and
(only with `--only adaptive`) a grid search against tpe + asha.

    .venv/bin/python benchmarks/run.py                         # small shape on CPU (CUDA when present)
    .venv/bin/python benchmarks/run.py --quick                 # fewer repetitions, no memory section
    .venv/bin/python benchmarks/run.py --full-shape            # adds the real 40x50x50 BNCNN
    .venv/bin/python benchmarks/run.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --only adaptive         # grid against tpe + asha (about 20 minutes)

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
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Each section's code is in its own module of the package `benchmarks`, imported as a package (not `from common
# import ...`) so that it works for `python benchmarks/run.py`, for this file loaded by path (tests/test_benchmarks.py)
# and in the memory child process; what the sections share is in common.py. See benchmarks/README.md.
from benchmarks.adaptive import bench_adaptive  # noqa: E402
from benchmarks.analysis import bench_analysis  # noqa: E402
from benchmarks.common import (  # noqa: E402
    OPT_IN,
    READING_MARKER,
    SECTIONS,
    Results,
    Row,
    Runner,
    machine,
    write_markdown,
)
from benchmarks.expand import bench_expand  # noqa: E402
from benchmarks.memory import bench_memory, memory_child  # noqa: E402
from benchmarks.pack import bench_pack  # noqa: E402
from benchmarks.throughput import bench_throughput_and_logging  # noqa: E402

__all__ = ["READING_MARKER", "RUNNERS", "SECTIONS", "Results", "Row", "main", "write_markdown"]

# Which function runs which sections (keys of SECTIONS), in the order they run; the table is then sorted by SECTIONS.
# A runner of several sections runs once when any of them is asked for (section 4 reads section 1's runs).
RUNNERS: dict[tuple[str, ...], Runner] = {
    ("throughput", "logging"): bench_throughput_and_logging,
    ("expand",): bench_expand,
    ("memory",): bench_memory,
    ("pack",): bench_pack,
    ("adaptive",): bench_adaptive,
    ("analysis",): bench_analysis,
}
assert sorted(k for keys in RUNNERS for k in keys) == sorted(SECTIONS), "every section needs exactly one runner"


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
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=[k for k in SECTIONS if k not in OPT_IN],
                   help=f"sections to run (default: all but {', '.join(OPT_IN)}: opt-in, run only when named)")
    p.add_argument("--mem-frames", type=int, default=360_000, help="train frames of the memory recording")
    p.add_argument("--mem-batches", type=int, default=100, help="training batches in the memory section")
    p.add_argument("--mem-batch-size", type=int, default=4, help="batch size in the memory section")
    p.add_argument("--mem-big-batch", type=int, default=512,
                   help="one extra training step at this batch size in the memory section (0: none)")
    p.add_argument("--pack-sizes", type=int, nargs="+", default=None,
                   help="pack sizes K of the packing section (default 4 8 on CPU, 4 with --quick, 8 32 on CUDA)")
    p.add_argument("--pack-precisions", nargs="+", choices=["fp32", "tf32", "bf16"], default=None,
                   help="precisions of the packing section's training pass (default fp32; fp32 bf16 on CUDA)")
    p.add_argument("--adaptive-epochs", type=int, default=None,
                   help="epochs per run of the adaptive section's searches (default 9; 3 with --tiny/--quick)")
    p.add_argument("--adaptive-trials", type=int, default=None,
                   help="trials of each tpe + asha search (default 32; 2 with --tiny/--quick)")
    p.add_argument("--adaptive-seeds", type=int, nargs="+", default=None,
                   help="sampler seeds of the adaptive section (default 0 1 2; 0 with --tiny/--quick)")
    p.add_argument("--adaptive-frames", type=int, default=None,
                   help="train frames of the adaptive section's recording (default 10000; 2000 with --tiny/--quick)")
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
        for keys, runner in RUNNERS.items():
            if any(key in args.only for key in keys):
                runner(res, args, tmp, device)
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
