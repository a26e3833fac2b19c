"""docs/run-on-kubernetes.md is true to the code: every `retina-trainer` command of its shell blocks runs as written
(against a real MLflow server; the example search copied under another exp_name so that other tests' runs do not
mix in), the manifests it renders pass the Kubernetes schemas, and every file it names exists. The user
administration snippets run against the authenticated server in tests/test_auth.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_k8s import container, validate_all

from conftest import ROOT
from trainer.cli import main

DOC = ROOT / "docs" / "run-on-kubernetes.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[str]:
    """The commands of the page's bash blocks, continuation lines joined, heredoc bodies left out."""
    out = []
    for block in shell_blocks(text):
        joined = re.sub(r"\\\n\s*", "", block)
        heredoc = None
        for line in joined.splitlines():
            if heredoc is not None:
                if line.strip() == heredoc:
                    heredoc = None
                continue
            m = re.search(r"<<'?(\w+)'?", line)
            if m:
                heredoc = m.group(1)
            line = line.split("  #")[0].strip()
            if line:
                out.append(line)
    return out


def trainer_commands() -> list[list[str]]:
    found = []
    for line in commands(DOC.read_text()):
        if line.startswith("retina-trainer "):
            words = shlex.split(line)
            if ">" in words:
                words = words[:words.index(">")]
            found.append(words[1:])
    return found


def test_the_page_shows_every_k8s_command_and_names_files_that_exist():
    subcommands = {tuple(c[:2]) for c in trainer_commands() if c[0] == "k8s"}
    assert {("k8s", "render"), ("k8s", "status"), ("k8s", "finish")} <= subcommands
    text = DOC.read_text()
    for path in sorted(set(re.findall(r"(?<![\w/.])((?:k8s|docker|docs|examples)/[\w./-]+\.(?:yaml|md|sh|json))",
                                      text))):
        assert (ROOT / path).exists(), f"{DOC.name} names {path}, which does not exist"
    for line in commands(text):  # every manifest kubectl applies is one of ours
        for path in re.findall(r"-f (k8s/\S+)", line):
            assert (ROOT / path).is_file(), line


def test_every_retina_trainer_command_of_the_page_runs(tmp_path, mlflow_server, monkeypatch):
    examples = tmp_path / "examples"
    examples.mkdir()
    hp = json.loads((ROOT / "examples" / "hyperparams.json").read_text())
    (examples / "hyperparams.json").write_text(json.dumps({**hp, "exp_name": "docs_walkthrough"}))
    (examples / "hyperranges.json").write_text((ROOT / "examples" / "hyperranges.json").read_text())
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(k, raising=False)

    def local(args: list[str]) -> list[str]:
        args = [str(examples / Path(a).name) if a.startswith("examples/") else a for a in args]
        return [mlflow_server if a == "http://127.0.0.1:5000" else a for a in args]

    ran = []
    for args in trainer_commands():
        if args[0] not in ("k8s", "expand"):
            continue  # register, evaluate, data synth: the README's commands, tested with them
        res = CliRunner().invoke(main, local(args))
        ran.append(args[:2])
        if args[:2] == ["k8s", "render"]:
            assert res.exit_code == 0, res.output
            cm, job = list(yaml.safe_load_all(res.stdout))
            validate_all([cm, job], "the page's render")
            assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lab-gpu"
            assert job["spec"]["suspend"] is True
            assert container(job)["resources"]["limits"]["nvidia.com/mig-3g.20gb"] == 1
            assert "/dev/shm" in [m["mountPath"] for m in container(job)["volumeMounts"]]
            names = {e["name"] for e in container(job)["env"]}
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "POD_NAME", "NODE_NAME"} <= names
        elif args[:2] == ["k8s", "status"]:
            assert res.exit_code == 0, res.output
            assert res.output.count("PENDING") >= 4  # rendered, not applied: no run started
        elif args[:2] == ["k8s", "finish"]:
            assert res.exit_code == 1, res.output  # nothing ran: the parent ends FAILED, naming the runs
            assert "4 of 4 runs" in res.output and "not started" in res.output
            assert "delete job,configmap -l retina-trainer/search-id=" in res.stderr  # printed: no cluster here
        else:
            assert res.exit_code == 0, res.output
    assert ["k8s", "render"] in ran and ["k8s", "status"] in ran and ["k8s", "finish"] in ran


def test_the_search_id_line_of_the_page_prints_the_search_id():
    line = next(c for c in commands(DOC.read_text()) if c.startswith("SEARCH=$("))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", "-c", f"{line}\necho $SEARCH"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    expanded = json.loads(subprocess.run([sys.executable, "-m", "trainer", "expand", "examples/hyperparams.json",
                                          "examples/hyperranges.json", "--json"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=120).stdout)
    assert out.stdout.strip() == expanded["search_id"]


@pytest.mark.parametrize("path", sorted((ROOT / "k8s" / "patches").glob("*.yaml")), ids=lambda p: p.name)
def test_the_example_patches_apply_and_pass_validation(tmp_path, path):
    from test_k8s import rendered

    from trainer.launch import k8s_patch

    patch = k8s_patch.load_patch(str(path))
    _, plain = rendered(tmp_path, gpus=1)
    _, docs = rendered(tmp_path, gpus=1, patches=[(f"--patch {path.name}", "strategic", patch)])
    validate_all(docs, path.name)
    assert docs[1] != plain[1]  # it changed something
    assert container(docs[1])["command"] == container(plain[1])["command"]
