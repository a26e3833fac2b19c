#!/usr/bin/env bash
# The main job: install, write a small synthetic recording, run a small search (BNCNN vs LN x two learning
# rates, each run analysed after training) logged to the embedded MLflow store in ./demo, print the summary table
# and write the first BNCNN's receptive fields to demo/analysis. Then: cd demo && mlflow ui
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
export MLFLOW_DISABLE_TELEMETRY=true
unset MLFLOW_TRACKING_URI MLFLOW_RUN_ID MLFLOW_EXPERIMENT_ID
mkdir -p demo
.venv/bin/retina-trainer data synth demo/data --dataset synth01 --stim-type whitenoise --cells 5 --size 20 \
  --train-frames 12000 --test-frames 1500 --repeats 5 --history 20 --seed 0 --interneurons 3000 --force
cd demo
../.venv/bin/retina-trainer search ../examples/hyperparams.json ../examples/hyperranges.json --data-root data
# the receptive fields of the first BNCNN, as a file here (every run logged them to MLflow already)
../.venv/bin/retina-trainer analyze runs/demo/demo_000_*/best.pt --only receptive_fields --data-root data \
  --out analysis --force
echo "Receptive fields of run 0 (BNCNN): $(pwd)/analysis/receptive_fields.png"
echo "Runs are in $(pwd)/mlflow.db: compare them with  cd demo && ../.venv/bin/mlflow ui"
echo "then open http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning (MLflow's model-training view)"
