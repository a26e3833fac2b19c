"""The analyses the original ran after training (docs/analysis.md): receptive fields, the retinal phenomena,
hidden units against recorded interneurons, and attribution. `trainer.analysis.run.analyze` runs them.

This module only names them (no torch): the `analysis` hyperparameter and `analyze --only` are checked against it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from trainer.errors import ConfigError

PARTS = ("receptive_fields", "phenomena", "interneurons", "attribution")
PHENOMENA = ("step_response", "paired_flash", "reversing_grating", "contrast_adaptation", "oms", "osr",
             "motion_reversal", "motion_anticipation")
NAMES = PARTS + PHENOMENA
NEEDS_HIDDEN = ("interneurons", "attribution")  # parts that read hidden layers (none in LN)


def check(value: Any) -> str | None:
    """What is wrong with an `analysis` value ("all", "none" or a list of names), or None."""
    if value in ("all", "none"):
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return 'must be "all", "none" or a list of analysis names'
    for v in value:
        if v not in NAMES:
            close = difflib.get_close_matches(v, NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"names an unknown analysis '{v}'{hint}: choose from {', '.join(NAMES)}"
    return None


def selection(value: str | Iterable[str]) -> list[str]:
    """The names an `analysis` value selects, in canonical order: "all" is every part, "none" nothing; a
    phenomenon's name selects it alone (ConfigError for an unknown name)."""
    if value == "all":
        return list(PARTS)
    if value == "none":
        return []
    names = list(value)
    problem = check(names)
    if problem:
        raise ConfigError(f"analysis {problem}")
    return [n for n in NAMES if n in names]


def parse_only(text: str) -> list[str]:
    """`analyze --only a,b`: the names, checked (a ConfigError names the choices)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--only needs analysis names, separated by commas: {', '.join(NAMES)}")
    problem = check(names)
    if problem:
        raise ConfigError(f"--only {problem}")
    return selection(names)


def phenomena_of(names: list[str]) -> tuple[str, ...]:
    """The phenomena a selection runs: every one with `phenomena`, else those named."""
    return PHENOMENA if "phenomena" in names else tuple(n for n in PHENOMENA if n in names)
