"""`python -m trainer`: the CLI, also in the original's form `python -m trainer hyperparams.json [hyperranges.json]`."""

from trainer.cli import run

run()
