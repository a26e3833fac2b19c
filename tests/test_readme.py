"""The README stays true to the CLI: its hyperparameter table is the CLI's, its commands exist."""

from pathlib import Path

from click.testing import CliRunner

from trainer.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_hyperparameter_table_matches_the_cli():
    text = README.read_text()
    table = text.split("<!-- params:start")[1].split("-->", 1)[1].split("<!-- params:end -->")[0]
    out = CliRunner().invoke(main, ["params", "--markdown"]).output
    assert table.strip() == out.strip()


def test_commands_in_the_readme_exist():
    runner = CliRunner()
    for args in (["search", "--help"], ["expand", "--help"], ["params", "--help"], ["data", "synth", "--help"],
                 ["data", "check", "--help"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 0, (args, res.output)
    for option in ("--data-root", "--no-progress"):
        assert option in runner.invoke(main, ["search", "--help"]).output
        assert option in README.read_text()


def test_every_test_named_in_the_differences_table_exists():
    """docs/differences.md names the test that holds each row; a renamed or deleted test must update the table."""
    import re

    table = (README.parent / "docs" / "differences.md").read_text()
    named = re.findall(r"`(test_\w+\.py)(?:::(\w+))?`", table)
    assert len(named) > 30
    for file, function in named:
        path = README.parent / "tests" / file
        assert path.is_file(), file
        if function:
            assert re.search(rf"^def {function}\(", path.read_text(), flags=re.M), f"{file}::{function}"


def test_help_lists_the_lazy_commands_with_their_own_first_line_and_imports_no_torch():
    import subprocess
    import sys

    from trainer.cli import Main

    main_help = CliRunner().invoke(main, ["--help"]).output
    for name, (module, attr) in Main.lazy.items():
        import importlib

        command = getattr(importlib.import_module(module), attr)
        first = " ".join(command.help.split())
        assert first.startswith(Main.lazy_help[name].rstrip(".")), (name, first[:80])
        assert name in main_help
    code = ("import sys; from trainer.cli import main\n"
            "for args in (['--help'], ['data', '--help'], ['k8s', '--help'], ['params']):\n"
            "    try: main(args, standalone_mode=False)\n"
            "    except SystemExit: pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'mlflow', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"
