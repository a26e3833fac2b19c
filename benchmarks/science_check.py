"""Print the science check's numbers (tests/test_science.py) for several seeds, to choose and review its margins.

    .venv/bin/python benchmarks/science_check.py                     # the test's settings, seeds 0-2
    .venv/bin/python benchmarks/science_check.py --seeds 0 1 2 3 4 5 --set train_frames=20000 --ln lr=0.002
    .venv/bin/python benchmarks/science_check.py --broken linear     # CNN without its nonlinearities: must fail

For each seed: mean Pearson r against the ground-truth test rates of the trained BNCNN, the trained LN, the
published LN baseline (RevCorLN: reverse correlation and a fitted polynomial, not trained) and the untrained
BNCNN, on the subunit cells and on the LN cells, and whether the test's criteria (`check`) pass, with
the failures listed in the JSON line.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import test_science as sc  # noqa: E402


def linearise(model: nn.Module) -> None:
    """Replace the BNCNN's ReLUs by the identity: the CNN then cannot express rectified subunits."""
    model.act1 = nn.Identity()
    model.act2 = nn.Identity()


BROKEN = {"linear": linearise}


def parse(items: list[str]) -> dict:
    """KEY=VALUE strings (VALUE a Python literal) as a dict."""
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        out[key] = ast.literal_eval(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recording or training setting (e.g. size=16, lr=0.01, n_epochs=8)")
    parser.add_argument("--cnn", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the CNN only (e.g. ksizes=[7,3], lr=0.01)")
    parser.add_argument("--ln", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the LN only (e.g. l2=0.001)")
    parser.add_argument("--broken", choices=sorted(BROKEN), help="break the CNN, to see the test fail")
    args = parser.parse_args()
    recording, training = {}, {}
    for key, value in parse(args.set).items():
        (recording if key in sc.RECORDING else training)[key] = value
    cnn, ln = parse(args.cnn), parse(args.ln)
    print("recording", {**sc.RECORDING, **recording}, "training", {**sc.TRAINING, **training},
          "cnn", {**sc.CNN, **cnn}, "ln", {**sc.LN, **ln}, "broken", args.broken, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            t0 = time.perf_counter()
            res = sc.measure(tmp, seed, recording=recording, training=training, cnn=cnn, ln=ln,
                             cnn_hook=BROKEN.get(args.broken))
            seconds = time.perf_counter() - t0
            problems = sc.check(res)
            row = {"seed": seed, "seconds": round(seconds, 1),
                   **{k: round(res[k], 3) for k in sc.SUMMARY_KEYS},
                   "cnn_minus_ln_subunit": round(res["cnn_subunit"] - res["ln_subunit"], 3),
                   "cnn_minus_ln_LN": round(res["cnn_LN"] - res["ln_LN"], 3),
                   "lead_sub_minus_lead_LN": round(res["cnn_subunit"] - res["ln_subunit"]
                                                   - res["cnn_LN"] + res["ln_LN"], 3),
                   "cnn_epochs": [round(h["val_pearson"], 3) for h in res["cnn_fit"].history],
                   "ln_epochs": [round(h["val_pearson"], 3) for h in res["ln_fit"].history],
                   "cnn_minus_revcor_subunit": round(res["cnn_subunit"] - res["revcor_subunit"], 3),
                   "passes": not problems, "problems": problems}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'seed':>4} {'CNN sub':>8} {'LN sub':>8} {'untr sub':>8} {'CNN-LN':>7} | "
          f"{'CNN LN':>7} {'LN LN':>7} {'untr LN':>7} {'CNN-LN':>7} | {'spec':>6} | {'FEVE CNN':>8} {'LN':>6} "
          f"{'s':>5} pass | {'RevCorLN sub':>12} {'RevCorLN LN':>11} {'FEVE':>6}")
    for r in rows:
        print(f"{r['seed']:>4} {r['cnn_subunit']:>8.3f} {r['ln_subunit']:>8.3f} {r['untrained_subunit']:>8.3f} "
              f"{r['cnn_minus_ln_subunit']:>7.3f} | {r['cnn_LN']:>7.3f} {r['ln_LN']:>7.3f} "
              f"{r['untrained_LN']:>7.3f} {r['cnn_minus_ln_LN']:>7.3f} | {r['lead_sub_minus_lead_LN']:>6.3f} | "
              f"{r['cnn_feve']:>8.3f} {r['ln_feve']:>6.3f} {r['seconds']:>5.0f} {r['passes']} | "
              f"{r['revcor_subunit']:>12.3f} {r['revcor_LN']:>11.3f} {r['revcor_feve']:>6.3f}")
    print("spec: the CNN's lead over LN on subunit cells minus its lead on LN cells; margins", sc.MARGINS)


if __name__ == "__main__":
    main()
