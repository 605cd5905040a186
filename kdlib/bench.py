"""``kdlib bench``: a grid of methods × pairs × seeds, reusing cached runs, written to results/.

Each run's record is copied into ``results/<profile>/`` and the folder gets a summary table
(``summary.csv`` and ``summary.md``) with mean ± std of last- and best-epoch top-1.
"""

from __future__ import annotations

import csv
from pathlib import Path

from kdlib import KDLibError
from kdlib.distill.base import NonFiniteLossError
from kdlib.profiles import PAPER_PAIRS, get_profile
from kdlib.results import SUMMARY_COLUMNS, markdown_table, summarise
from kdlib.run_store import export_record, load_records, results_root
from kdlib.train import EngineOptions, diverged_record, run

BOOK_METHODS = ("vanilla", "kd", "fitnets", "at", "afd", "sakd", "aftkd", "sam_kd", "lakd")


def grid(profile_name: str | None, methods=None, seeds=None):
    """The configs of the grid, in run order (all seeds of a method together)."""
    profile = get_profile(profile_name)
    methods = list(methods or BOOK_METHODS)
    seeds = list(profile.seeds if seeds is None else seeds)
    pairs = PAPER_PAIRS if profile.name == "paper" else ((profile.teacher, profile.student),)
    return [
        profile.config(m, teacher=t, student=s, seed=seed)
        for t, s in pairs
        for m in methods
        for seed in seeds
    ]


def write_summary(folder: Path) -> list[dict]:
    rows = summarise(load_records(folder))
    (folder / "summary.md").write_text(markdown_table(rows, SUMMARY_COLUMNS) + "\n")
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "teacher", "student", "seeds", "top1_last_mean", "top1_last_std",
                    "top1_best_mean", "top1_best_std", "epoch_time_s", "peak_mem_mb", "diverged"])
        for r in rows:  # means and stds are over the complete runs; "diverged" counts the others
            w.writerow([r["method"], r["teacher"], r["student"], r["seeds"], *r["top1_last"],
                        *r["top1_best"], f"{r['epoch_time_s']:.3f}", f"{r['peak_mem_mb']:.1f}", r["diverged"]])
    return rows


def run_grid(profile_name=None, methods=None, seeds=None, out=None, device=None, progress=True) -> list[dict]:
    profile = get_profile(profile_name)
    folder = Path(out) if out else results_root() / profile.name
    options = EngineOptions(device=device, progress=progress)
    diverged = []
    for cfg in grid(profile.name, methods, seeds):
        try:
            record = run(cfg, options=options)
        except NonFiniteLossError as e:  # a result to keep; the grid goes on and reports it at the end
            record = diverged_record(e, cfg)
            if record is None:
                raise  # e.g. the teacher diverged: nothing of this run to keep
            diverged.append(f"{record['name']} ({record.get('error', e)})")
        export_record(record, folder)
    rows = write_summary(folder)
    print(markdown_table(rows, SUMMARY_COLUMNS))
    if diverged:
        raise KDLibError(f"{len(diverged)} run(s) diverged, summary written with them marked: " + "; ".join(diverged))
    return rows
