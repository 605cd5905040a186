"""The book grid's comparisons from records: entries found by method and options, paired by seed, Holm."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kdlib.grid import by_entry, entry_of, grid_comparisons
from kdlib.profiles import get_profile

SMOKE = get_profile("smoke")


def rec(method, seed, acc, **options):
    cfg = SMOKE.config(method, seed=seed, **options)
    return {"name": f"{method}-{seed}", "config": cfg.to_dict(), "seed": seed, "status": "complete",
            "top1_last": acc, "history": []}


def test_records_are_grouped_by_entry_and_ablations_left_out():
    assert entry_of(rec("at_kd", 0, 1.0)["config"]).label == "AT+KD"
    assert entry_of(rec("at", 0, 1.0)["config"]).label == "AT"
    assert entry_of(rec("sakd", 0, 1.0, p=0.3)["config"]) is None  # an ablation is not the grid's run
    groups = by_entry([rec("kd", 0, 90.0), rec("kd", 1, 91.0), rec("sakd", 0, 1.0, p=0.3)])
    assert list(groups) == ["KD"] and len(groups["KD"]) == 2


def test_grid_comparisons_pair_by_seed_against_the_right_reference_and_adjust_as_one_table():
    van = [rec("vanilla", s, a) for s, a in enumerate([90.0, 91.0, 89.0, 90.5, 90.0])]
    kd = [rec("kd", s, a + 2.0 + 0.1 * s) for s, a in enumerate([90.0, 91.0, 89.0, 90.5, 90.0])]
    atkd = [rec("at_kd", s, k["top1_last"] + (0.3 if s % 2 else -0.3)) for s, k in enumerate(kd)]
    comps = {c.label: c for c in grid_comparisons(van + kd + atkd)}
    assert set(comps) == {"KD − vanilla", "AT+KD − KD"}
    assert comps["KD − vanilla"].mean == pytest.approx(2.2) and comps["KD − vanilla"].verdict == "ahead"
    assert comps["AT+KD − KD"].verdict == "not resolved with 5 seeds"
    assert all(c.family == 2 for c in comps.values())


def reexecution_check():
    """benchmarks/reexecution_check.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "reexecution_check.py"
    spec = importlib.util.spec_from_file_location("reexecution_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reexecution_check_compares_verdict_words():
    mod = reexecution_check()
    before = {"A": {"verdict": "ahead"}, "B": {"verdict": "not resolved with 5 seeds"}, "C": {"verdict": "behind"}}
    after = {"A": {"verdict": "ahead"}, "B": {"verdict": "not resolved with 4 seeds"}, "C": {"verdict": "ahead"}}
    assert mod.held(before, after) == {"A": True, "B": True, "C": False}


def test_reexecution_check_compares_two_executions_without_training(tmp_path):
    from kdlib.run_store import write_json_atomic

    mod = reexecution_check()
    van = [90.0, 91.0, 89.0, 90.5, 90.0]
    executions = {"before": [2.0, 2.1, 2.2, 2.3, 2.4], "after": [-0.5, 0.4, -0.2, 0.6, -0.1]}
    for name, gains in executions.items():
        for s, (v, g) in enumerate(zip(van, gains, strict=True)):
            for r in (rec("vanilla", s, v), rec("kd", s, v + g)):
                write_json_atomic(tmp_path / name / f"{r['name']}.json", r | {"device": f"cpu ({name})"})
    out = tmp_path / "check.json"
    result = mod.main(["--profile", "smoke", "--before", str(tmp_path / "before"), "--after",
                       str(tmp_path / "after"), "--out", str(out)])
    assert result["held"] == {"KD − vanilla": False}  # ahead before, not resolved after
    assert result["committed"]["KD − vanilla"]["verdict"] == "ahead"
    assert result["rerun"]["KD − vanilla"]["verdict"] == "not resolved with 5 seeds"
    assert result["devices"] == {"committed": ["cpu (before)"], "rerun": ["cpu (after)"]}
    assert out.is_file()
