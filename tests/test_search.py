"""Expansion: order, count, identity, seeds, names; and that it stays free of torch and mlflow."""

import json
import subprocess
import sys

import pytest

from trainer import search
from trainer.errors import ConfigError


def files(tmp_path, hp, hr=None):
    hp_path = tmp_path / "hp.json"
    hp_path.write_text(json.dumps(hp))
    hr_path = None
    if hr is not None:
        hr_path = tmp_path / "hr.json"
        hr_path.write_text(json.dumps(hr))
    return hp_path, hr_path


def test_no_ranges_is_one_run(tmp_path):
    s = search.expand(*files(tmp_path, {"lr": 0.01}))
    assert len(s.runs) == 1 and s.runs[0].config["lr"] == 0.01 and s.runs[0].searched == {}


def test_product_order_first_key_outermost_repeats_innermost(tmp_path):
    s = search.expand(*files(tmp_path, {"n_repeats": 2, "seed": 7},
                             {"lr": [0.1, 0.01], "chans": [[8, 8], [4, 4], [2, 2]]}))
    assert len(s.runs) == 2 * 3 * 2
    got = [(r.config["lr"], r.config["chans"], r.repeat) for r in s.runs]
    expected = [(lr, ch, rep) for lr in (0.1, 0.01) for ch in ([8, 8], [4, 4], [2, 2]) for rep in (0, 1)]
    assert got == expected
    assert [r.index for r in s.runs] == list(range(12))


def test_key_order_of_the_ranges_file_decides_nesting(tmp_path):
    a = search.expand(*files(tmp_path, {}, {"lr": [0.1, 0.2], "l2": [0.0, 1.0]}))
    b = search.expand(*files(tmp_path, {}, {"l2": [0.0, 1.0], "lr": [0.1, 0.2]}))
    assert [r.config["lr"] for r in a.runs] == [0.1, 0.1, 0.2, 0.2]
    assert [r.config["lr"] for r in b.runs] == [0.1, 0.2, 0.1, 0.2]


def test_seeds_repeat0_is_base_and_repeats_differ(tmp_path):
    s = search.expand(*files(tmp_path, {"n_repeats": 3, "seed": 5}, {"lr": [0.1, 0.2]}))
    seeds = [r.seed for r in s.runs]
    assert seeds[0] == 5 and seeds[3] == 5  # repeat 0 of each combination uses the base seed
    assert len(set(seeds[:3])) == 3  # repeats differ
    assert seeds[:3] == seeds[3:]  # the same repeat number gets the same seed in every combination
    assert all(r.config["seed"] == r.seed for r in s.runs)
    # the repeats' seeds come from the base seed: another base seed gives other repeats, not only another repeat 0
    other = search.expand(*files(tmp_path, {"n_repeats": 3, "seed": 6}, {"lr": [0.1, 0.2]}))
    assert other.runs[0].seed == 6 and not {r.seed for r in other.runs[1:3]} & set(seeds[1:3])


def test_ids_are_stable_distinct_and_ignore_where_files_live(tmp_path):
    hp = {"n_repeats": 2}
    hr = {"lr": [0.1, 0.2]}
    a = search.expand(*files(tmp_path, hp, hr))
    b = search.expand(*files(tmp_path, dict(hp, data_root="/elsewhere", save_root="/x", device="cpu"), hr))
    assert [r.config_id for r in a.runs] == [r.config_id for r in b.runs]
    assert a.search_id == b.search_id
    assert len({r.config_id for r in a.runs}) == 4
    c = search.expand(*files(tmp_path, dict(hp, batch_size=64), hr))
    assert not {r.config_id for r in a.runs} & {r.config_id for r in c.runs}


def test_names_are_readable_and_unique(tmp_path):
    s = search.expand(*files(tmp_path, {"exp_name": "my_exp", "n_repeats": 2}, {"bnorm": [True, False]}))
    assert [r.name for r in s.runs] == ["my_exp_000_bnormT_r0", "my_exp_001_bnormT_r1",
                                        "my_exp_002_bnormF_r0", "my_exp_003_bnormF_r1"]


def test_duplicate_values_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="runs 0 and 1 have the same configuration"):
        search.expand(*files(tmp_path, {}, {"lr": [0.1, 0.1]}))


def test_cross_key_error_names_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"run 1 \(scheduler=\"MultiStepLR\"\).*scheduler_milestones"):
        search.expand(*files(tmp_path, {"scheduler_milestones": []}, {"scheduler": ["none", "MultiStepLR"]}))


def test_expand_imports_neither_torch_nor_mlflow(tmp_path):
    hp, hr = files(tmp_path, {}, {"lr": [0.1, 0.2]})
    code = ("import sys; from trainer.cli import main\n"
            f"main(['expand', {str(hp)!r}, {str(hr)!r}, '--json'], standalone_mode=False)\n"
            "print('HEAVY', 'torch' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY False False" in out
    listed = json.loads(out[: out.index("HEAVY")])
    assert [r["config"]["lr"] for r in listed["runs"]] == [0.1, 0.2]


def test_expand_with_pack_shows_the_pack_of_each_run(tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main

    hp, hr = files(tmp_path, {"n_repeats": 2}, {"chans": [[8, 8], [4, 8]], "lr": [0.1, 0.2]})
    res = CliRunner().invoke(main, ["expand", str(hp), str(hr), "--pack", "3", "--json"])
    assert res.exit_code == 0, res.output
    packs = [r["pack"] for r in json.loads(res.stdout)["runs"]]  # warnings (log_poisson unset) go to stderr
    # chans [8, 8] (runs 0-3) and [4, 8] (runs 4-7) never share a pack; each splits into 3 + 1
    assert packs == [0, 0, 0, 1, 2, 2, 2, 3]
    table = CliRunner().invoke(main, ["expand", str(hp), str(hr), "--pack", "3"])
    assert "8 runs in 4 packs of up to 3" in table.stdout and " pack " in table.stdout.splitlines()[1]
    plain = CliRunner().invoke(main, ["expand", str(hp), str(hr)])
    assert "pack" not in plain.stdout.splitlines()[1] and "pack" not in json.loads(
        CliRunner().invoke(main, ["expand", str(hp), str(hr), "--json"]).stdout)["runs"][0]
