"""Run records → tables: config hashing, grouping by options, mean ± std, Markdown."""

from __future__ import annotations

import numpy as np
import pytest

from kdlib.config import RunConfig
from kdlib.profiles import get_profile
from kdlib.report import curve, table
from kdlib.results import fmt_mean_std, markdown_table, mean_std, method_label, summarise
from kdlib.run_store import config_hash


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


def diverged_record(seed=2, epochs_done=2, epoch=None):
    """What the engine writes: the completed epochs, no accuracy, no peak memory."""
    rec = fake_record(seed=seed, epochs=epochs_done)
    rec.update(status="diverged", top1_last=None, top1_best=None, diverged_epoch=epoch or epochs_done + 1,
               error="loss term 'feat' is inf at step 9")
    del rec["peak_memory"]
    return rec


def test_diverged_runs_are_counted_not_averaged():
    ok = [fake_record(seed=0, last=80), fake_record(seed=1, last=82)]
    ok[1]["peak_memory"] = {"bytes": 3 * 2**20}
    rows = {r["method"]: r for r in summarise([*ok, diverged_record()])}
    assert rows["kd"]["seeds"] == 3 and rows["kd"]["diverged"] == 1
    assert rows["kd"]["top1_last_str"] == "81.00 ± 1.41 (1 diverged)"
    assert rows["kd"]["top1_last"][0] == pytest.approx(81.0)
    assert rows["kd"]["peak_mem_mb"] == pytest.approx(2.0)  # the complete runs only
    first_epoch = diverged_record(epochs_done=0)  # no epoch finished: no time per epoch either
    out = table({"iteration": [first_epoch]})
    assert "| iteration | 1 | diverged (epoch 1) | diverged (epoch 1) | nan |" in out
    unknown = dict(first_epoch, diverged_epoch=None)
    assert summarise([unknown, diverged_record(epoch=4)])[0]["top1_last_str"] == "diverged (epoch ?, 4)"


def test_curve_pads_a_shorter_diverged_history_with_nan():
    acc = curve([fake_record(seed=0, last=80), diverged_record(epochs_done=2)], "test_acc")
    assert acc.shape == (2, 3) and np.isnan(acc[1, 2]) and not np.isnan(acc[1, :2]).any()


def test_stored_runs_reads_committed_records_only(tmp_path, monkeypatch):
    from kdlib import report
    from kdlib.run_store import export_record, run_name

    monkeypatch.setenv("KDLIB_RESULTS", str(tmp_path))
    monkeypatch.setattr(report, "run", lambda *a, **k: pytest.fail("stored_runs must never train"))
    cfg = get_profile("smoke").config("kd", seed=0, tau=2.0)
    assert report.stored_runs("smoke", "kd", seeds=[0], tau=2.0) == []
    rec = dict(fake_record(seed=0, options={"tau": 2.0}), name=run_name(cfg), hash=config_hash(cfg))
    export_record(rec, tmp_path / "smoke")
    assert report.stored_runs("smoke", "kd", seeds=[0, 1], tau=2.0) == [rec]  # seed 1 has no record
    export_record(dict(rec, hash="0" * 16), tmp_path / "smoke")  # same file name, another config
    assert report.stored_runs("smoke", "kd", seeds=[0], tau=2.0) == []


def test_curve_reads_metrics_and_loss_terms():
    recs = [fake_record(seed=0, last=80), fake_record(seed=1, last=82)]
    acc = curve(recs, "test_acc")
    assert acc.shape == (2, 3) and acc[1, -1] == 82
    assert curve(recs, "ce")[0].tolist() == pytest.approx([1.0, 0.5, 1 / 3])


def test_report_runs_returns_diverged_records_only_when_asked(monkeypatch):
    from kdlib import report
    from kdlib.distill import NonFiniteLossError

    cfg = get_profile("smoke").config("kd", seed=0)
    bad = dict(diverged_record(seed=0), hash=config_hash(cfg))

    def diverging_run(cfg, options=None):
        raise NonFiniteLossError("loss term 'feat' is inf at step 9", record=bad)

    monkeypatch.setattr(report, "run", diverging_run)
    with pytest.raises(NonFiniteLossError, match="'feat' is inf at step 9"):
        report.runs("smoke", "kd", seeds=[0])
    assert report.runs("smoke", "kd", seeds=[0], allow_diverged=True) == [bad]
    # A teacher that diverged is not the student's result, even with allow_diverged.
    bad["hash"] = config_hash(cfg.teacher)
    with pytest.raises(NonFiniteLossError):
        report.runs("smoke", "kd", seeds=[0], allow_diverged=True)


def test_grid_keeps_going_past_a_diverged_run_and_reports_it(tmp_path, monkeypatch):
    import kdlib.bench
    from kdlib import KDLibError
    from kdlib.distill import NonFiniteLossError

    def fake_run(cfg, options=None):
        rec = dict(fake_record(method=cfg.method, seed=cfg.seed), name=f"{cfg.method}-s{cfg.seed}",
                   hash=config_hash(cfg), config=cfg.to_dict())
        if cfg.method == "kd":
            raise NonFiniteLossError("loss term 'kd' is nan at step 3", record=dict(
                rec, status="diverged", top1_last=None, top1_best=None, diverged_epoch=1, history=[]))
        return rec

    monkeypatch.setattr(kdlib.bench, "run", fake_run)
    with pytest.raises(KDLibError, match=r"1 run\(s\) diverged.*kd-s0 \(loss term 'kd' is nan at step 3\)"):
        kdlib.bench.run_grid("smoke", methods=["kd", "at"], seeds=[0], out=tmp_path, progress=False)
    assert {p.name for p in tmp_path.glob("*.json")} == {"kd-s0.json", "at-s0.json"}
    summary = (tmp_path / "summary.md").read_text()
    assert "diverged (epoch 1)" in summary and "| at |" in summary
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert header.endswith(",diverged")


def test_plot_curves_joins_the_epochs_that_were_scored():
    import matplotlib

    matplotlib.use("Agg")
    from kdlib.report import plot_curves

    recs = [fake_record(seed=s, last=80.0 + s, epochs=4) for s in (0, 1)]
    for r in recs:  # eval_every = 2: epochs 1 and 3 have no test score
        for h in r["history"][::2]:
            del h["test_acc"]
    ax = plot_curves({"kd": recs})
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [2, 4]
    assert list(line.get_ydata()) == pytest.approx([(78.0 + 79.0) / 2, (80.0 + 81.0) / 2])
