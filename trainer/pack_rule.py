"""What may share a pack: the one rule that both `search.plan_packs` (grouping a search's runs) and
`training.packed.PackedTrainer` (refusing members it cannot train together) apply. Pure (no torch).

A pack runs one forward pass of member 0's modules over one batch stream, so its members may differ only in the
settings each member applies on its own (PACK_MEMBER_KEYS: optimiser, stopping rule, schedule, seed, analyses);
every other setting must be equal, or a member would silently train as member 0 does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

# The settings in which the members of a pack may differ: the optimiser, the stopping rule and the seed (each member
# builds its own initial weights from it), and what each analyses after training. Every other setting (recording,
# architecture, activation, noise, batch size, loss, precision, device) must be equal.
PACK_MEMBER_KEYS = frozenset({
    "seed", "lr", "l2", "l1", "n_epochs", "early_stopping", "save_every_epoch",
    "scheduler", "scheduler_scale", "scheduler_patience", "scheduler_thresh", "scheduler_milestones",
    "scheduler_gamma", "scheduler_original",
    "analysis", "analysis_sta_hold", "analysis_interneurons",  # each member's own analyses
})


def trains_alone(cfg: dict[str, Any]) -> str | None:
    """Why a run can never share a pack, or None: pruning (it changes each member's channels), the retinotopic loop
    (its extra terms read each model's read-out), compile and RevCorLN (fitted in closed form, not trained)."""
    if cfg["prune"]:
        return "prune"
    if cfg["train_loop"] != "train_loop":
        return f"train_loop {cfg['train_loop']}"
    if cfg["compile"]:
        return "compile"
    if cfg["model_type"] == "RevCorLN":
        return "model_type RevCorLN"
    return None


def shared_part(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings every member of a pack must share: all but PACK_MEMBER_KEYS."""
    return {k: v for k, v in cfg.items() if k not in PACK_MEMBER_KEYS}


def pack_key(cfg: dict[str, Any]) -> str | None:
    """Equal for runs that may share a pack, None for a run that always trains alone."""
    if trains_alone(cfg) is not None:
        return None
    blob = json.dumps(shared_part(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pack_conflict(cfgs: Sequence[dict[str, Any]]) -> str | None:
    """Why these configurations cannot train as one pack (one line naming the member and the setting), or None."""
    if not cfgs:
        return None
    for i, cfg in enumerate(cfgs):
        reason = trains_alone(cfg)
        if reason is not None:
            return f"pack member {i} has {reason}: such runs train alone, not in a pack"
    lead = shared_part(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        mine = shared_part(cfg)
        for key in sorted(set(lead) | set(mine)):
            if mine.get(key) != lead.get(key):
                return (f"pack member {i} has {key}={mine.get(key)!r}, member 0 {lead.get(key)!r}: members of a "
                        f"pack may differ only in {', '.join(sorted(PACK_MEMBER_KEYS))}")
    return None
