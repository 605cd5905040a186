"""Run records → tables: config hashing, grouping by options, mean ± std, Markdown."""

from __future__ import annotations

import pytest

from kdlib.config import RunConfig
from kdlib.profiles import get_profile
from kdlib.report import curve, table
from kdlib.results import config_hash, fmt_mean_std, markdown_table, mean_std, method_label, summarise


def fake_record(method="kd", seed=0, last=80.0, best=81.0, options=None, epochs=3):
    cfg = get_profile("smoke").config(method, seed=seed, **(options or {}))
    hist = [{"epoch": e + 1, "losses": {"ce": 1.0 / (e + 1)}, "test_acc": last - (epochs - 1 - e), "time_s": 2.0}
            for e in range(epochs)]
    return {"name": f"{method}-{seed}", "config": cfg.to_dict(), "history": hist, "top1_last": last,
            "top1_best": best, "wall_time_s": 2.0 * epochs, "peak_memory": {"bytes": 2**20}}


def test_config_hash_is_stable_and_sensitive():
    prof = get_profile("smoke")
    a, b = prof.config("sakd", seed=0), prof.config("sakd", seed=0)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(prof.config("sakd", seed=1))
    assert config_hash(a) != config_hash(prof.config("sakd", seed=0, p=0.3))
    # A different teacher recipe is a different run, even with the same student config.
    other_teacher = a.replace(teacher=a.teacher.replace(seed=7))
    assert config_hash(a) != config_hash(other_teacher)
    assert RunConfig.from_dict(a.to_dict()) == a


def test_mean_std_and_format():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt_mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert fmt_mean_std([5.0]) == "5.00"


def test_summarise_pools_seeds_and_keeps_ablations_apart():
    recs = [fake_record(seed=0, last=80), fake_record(seed=1, last=82),
            fake_record(seed=0, last=70, options={"tau": 2.0})]
    rows = {r["method"]: r for r in summarise(recs)}
    assert set(rows) == {"kd", "kd (tau=2.0)"}
    assert rows["kd"]["seeds"] == 2 and rows["kd"]["top1_last"][0] == pytest.approx(81.0)
    assert rows["kd (tau=2.0)"]["seeds"] == 1
    label = method_label({"method": "sakd", "method_options": {"p": 0.3, "taps": "stages"}})
    assert label == "sakd (p=0.3, taps='stages')"


def test_markdown_table_and_report_table():
    md = markdown_table([{"a": 1, "b": 2.345}], [("a", "A"), ("b", "B")])
    assert md.splitlines() == ["| A | B |", "|---|---|", "| 1 | 2.35 |"]
    out = table({"KD": [fake_record(seed=0, last=80), fake_record(seed=1, last=82)]}, highlight="KD")
    assert "| **KD** | 2 | 81.00 ± 1.41 | 81.00 ± 0.00 | 2.00 |" in out


def test_diverged_runs_are_counted_not_averaged():
    bad = dict(fake_record(seed=2), status="diverged", top1_last=None, top1_best=None, diverged_epoch=3)
    rows = {r["method"]: r for r in summarise([fake_record(seed=0, last=80), fake_record(seed=1, last=82), bad])}
    assert rows["kd"]["seeds"] == 3
    assert rows["kd"]["top1_last_str"] == "81.00 ± 1.41 (1 diverged)"
    alone = dict(bad, history=[])  # diverged in its first epoch: no time per epoch either
    out = table({"iteration": [alone]})
    assert "| iteration | 1 | diverged (epoch 3) | diverged (epoch 3) | nan |" in out


def test_curve_reads_metrics_and_loss_terms():
    recs = [fake_record(seed=0, last=80), fake_record(seed=1, last=82)]
    acc = curve(recs, "test_acc")
    assert acc.shape == (2, 3) and acc[1, -1] == 82
    assert curve(recs, "ce")[0].tolist() == pytest.approx([1.0, 0.5, 1 / 3])


def test_report_runs_returns_diverged_records_only_when_asked(monkeypatch):
    from kdlib import report
    from kdlib.distill import NonFiniteLossError

    bad = dict(fake_record(seed=0), status="diverged", top1_last=None, top1_best=None, diverged_epoch=2)

    def diverging_run(cfg, options=None):
        raise NonFiniteLossError("loss term 'feat' is inf at step 9", record=bad)

    monkeypatch.setattr(report, "run", diverging_run)
    with pytest.raises(NonFiniteLossError, match="'feat' is inf at step 9"):
        report.runs("smoke", "kd", seeds=[0])
    assert report.runs("smoke", "kd", seeds=[0], allow_diverged=True) == [bad]
