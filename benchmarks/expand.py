"""Section 3, expand and render: `expand()` in-process, `retina-trainer expand` and `retina-trainer k8s render` as
subprocesses on a 1,000-run search, against `python -c pass`, interleaved.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Results, _time_call, _timed_cmd, median


def bench_expand(res: Results, args: argparse.Namespace, tmp: Path, device: str) -> None:
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
