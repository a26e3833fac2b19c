"""Expand hyperparams + hyperranges into an ordered list of runs, each with a stable identity.

Pure (no torch, no mlflow). Run N is the same run on every machine: the order is the Cartesian product of the
ranges in the file's key order (first key outermost), each combination repeated n_repeats times (innermost).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer import config
from trainer.errors import ConfigError
from trainer.pack_rule import pack_key


@dataclass(frozen=True)
class RunSpec:
    """One expanded run: its position, identity, seed and full resolved configuration."""

    index: int
    name: str
    config_id: str
    seed: int
    repeat: int
    searched: dict[str, Any]  # the values this run takes for the searched keys, in ranges order
    config: dict[str, Any]  # every hyperparameter, seed included

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Search:
    """An expanded search: its runs, a stable id, and the warnings worth telling the user."""

    search_id: str
    exp_name: str
    runs: tuple[RunSpec, ...]
    searched_keys: tuple[str, ...]
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"search_id": self.search_id, "exp_name": self.exp_name, "searched_keys": list(self.searched_keys),
                "runs": [r.to_dict() for r in self.runs]}

    def to_compact_dict(self) -> dict[str, Any]:
        """The runs without repeating the shared settings: run i's config is base_config + its searched values
        + its seed. Small enough for large searches (a 1,000-run to_dict is over 1 MB)."""
        base = {k: v for k, v in self.runs[0].config.items() if k not in self.searched_keys and k != "seed"}
        runs = [{k: v for k, v in r.to_dict().items() if k != "config"} for r in self.runs]
        return {"search_id": self.search_id, "exp_name": self.exp_name, "searched_keys": list(self.searched_keys),
                "base_config": base, "runs": runs}


def _digest(obj: Any, n: int = 12) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:n]


def config_id(cfg: dict[str, Any]) -> str:
    """Stable id of a run's configuration: a hash of every key that says what is trained, seed included."""
    return _digest(config.identity_view(cfg))


def repeat_seed(base: int, repeat: int) -> int:
    """Seed of repeat `repeat`: the base seed for repeat 0, a hash-derived distinct seed for the others."""
    if repeat == 0:
        return base
    return int(hashlib.sha256(f"{base}:{repeat}".encode()).hexdigest()[:8], 16) % (2**31 - 1)


def plural(n: int, word: str) -> str:
    """'1 run', '2 runs': a count with its noun."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def short_value(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, list):
        return "-".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


RUN_NAME_LIMIT = 250  # bytes: the run name is a folder name (255 at most on common file systems) and an MLflow name


def run_name(exp_name: str, index: int, searched: dict[str, Any], repeat: int, n_repeats: int) -> str:
    """Readable run name: <exp_name>_<index>_<key><value>..., with _r<repeat> when repeated."""
    parts = [exp_name, f"{index:03d}"] + [f"{k}{short_value(v)}" for k, v in searched.items()]
    if n_repeats > 1:
        parts.append(f"r{repeat}")
    return "_".join(parts).replace("/", "-")


def expand(hyperparams: str | Path, hyperranges: str | Path | None = None) -> Search:
    """Read, validate and expand the two files into a Search; any problem is a ConfigError before anything runs."""
    params = config.load_hyperparams(hyperparams)
    ranges = config.load_hyperranges(hyperranges)
    base = config.resolve(params.values)
    keys = tuple(ranges.values)
    runs: list[RunSpec] = []
    for combo in itertools.product(*(ranges.values[k] for k in keys)):
        searched = dict(zip(keys, combo))
        combo_cfg = {**base, **searched}
        for repeat in range(base["n_repeats"]):
            cfg = dict(combo_cfg, seed=repeat_seed(combo_cfg["seed"], repeat))
            index = len(runs)
            where = f"run {index} ({', '.join(f'{k}={json.dumps(v)}' for k, v in searched.items()) or 'defaults'})"
            config.check_run(cfg, where)
            name = run_name(base["exp_name"], index, searched, repeat, base["n_repeats"])
            if len(name.encode()) > RUN_NAME_LIMIT:
                raise ConfigError(f"{where}: its run name {name[:40]}... is {len(name.encode())} bytes long, more "
                                  f"than a folder name may be ({RUN_NAME_LIMIT}); shorten exp_name or the searched "
                                  "values")
            runs.append(RunSpec(index=index, name=name,
                                config_id=config_id(cfg), seed=cfg["seed"], repeat=repeat, searched=searched,
                                config=cfg))
    seen: dict[str, int] = {}
    for r in runs:
        if r.config_id in seen:
            raise ConfigError(f"{hyperranges}: runs {seen[r.config_id]} and {r.index} have the same configuration "
                              f"({r.name}); remove the duplicate value from the ranges")
        seen[r.config_id] = r.index
    search_id = _digest([r.config_id for r in runs], 10)
    return Search(search_id=search_id, exp_name=base["exp_name"], runs=tuple(runs), searched_keys=keys,
                  warnings=tuple(params.warnings + ranges.warnings
                                 + config.unset_log_poisson(params, ranges, str(hyperparams))))


# ---- packing: runs that can train together on one device, sharing each batch -------------------------------------

def without_analysis(search: Search) -> Search:
    """The same search with `analysis` "none" for every run (`search --no-analysis`); run identities unchanged."""
    runs = tuple(dataclasses.replace(r, config={**r.config, "analysis": "none"}) for r in search.runs)
    return dataclasses.replace(search, runs=runs)


def plan_packs(runs: list[RunSpec] | tuple[RunSpec, ...], size: int) -> list[list[RunSpec]]:
    """Group runs into packs of at most `size` runs with equal pack keys, in run order (a pack's place is its first
    run's); runs that cannot be packed, and all runs when size is 1, form packs of one."""
    if size < 1:
        raise ConfigError(f"--pack must be at least 1, got {size}")
    packs: list[list[RunSpec]] = []
    open_packs: dict[str, list[RunSpec]] = {}
    for spec in runs:
        key = pack_key(spec.config) if size > 1 else None
        pack = open_packs.get(key) if key is not None else None
        if pack is None or len(pack) >= size:
            pack = [spec]
            packs.append(pack)
            if key is not None:
                open_packs[key] = pack
        else:
            pack.append(spec)
    return packs
