"""What the notebooks call to train, tabulate and plot: thin layers over the engine and records.

``runs(profile, method, ...)`` trains (or loads from the cache) one run per seed; in the ``book``
profile it also exports each record into ``results/book/`` so that every number the book shows is
a committed record. ``table`` and ``plot_curves`` read records only.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from kdlib import KDLibError, style
from kdlib.distill.base import NonFiniteLossError
from kdlib.profiles import get_profile
from kdlib.results import is_complete, markdown_table, outcome
from kdlib.run_store import (
    CHECKPOINT,
    config_hash,
    export_record,
    load_checkpoint,
    load_record,
    results_root,
    run_dir,
    run_name,
)
from kdlib.train import EngineOptions, diverged_record, load_model, num_classes, run


def runs(profile: str, method: str, *, seeds=None, student=None, teacher=None, progress=True,
         allow_diverged=False, **options) -> list[dict]:
    """One record per seed (cached runs are reused); book-profile records go to results/book/.

    A run stopped by a NaN/inf loss raises :class:`NonFiniteLossError`; with ``allow_diverged`` its
    ``diverged`` record is returned instead (``top1_last`` is None, ``error`` says what happened).
    """
    prof = get_profile(profile)
    out = []
    for seed in prof.seeds if seeds is None else seeds:
        cfg = prof.config(method, student=student, teacher=teacher, seed=seed, **options)
        try:
            rec = run(cfg, options=EngineOptions(progress=progress))
        except NonFiniteLossError as e:
            rec = diverged_record(e, cfg) if allow_diverged else None
            if rec is None:
                raise
        if prof.name == "book":
            export_record(rec, results_root() / "book")
        out.append(rec)
    return out


def stored_runs(profile: str, method: str, *, seeds=None, student=None, teacher=None, **options) -> list[dict]:
    """The committed records in ``results/<profile>/`` of these runs, without training anything.

    For options a chapter shows from a run made once but that ``make book`` does not re-run (its
    time budget): only the record is there, not the weights. Seeds without a record are left out.
    """
    prof = get_profile(profile)
    out = []
    for seed in prof.seeds if seeds is None else seeds:
        cfg = prof.config(method, student=student, teacher=teacher, seed=seed, **options)
        path = results_root() / prof.name / f"{run_name(cfg)}.json"
        if path.exists():
            rec = load_record(path)
            if rec.get("hash") == config_hash(cfg):
                out.append(rec)
    return out


def teacher_record(profile: str, teacher: str | None = None) -> dict:
    prof = get_profile(profile)
    rec = run(prof.teacher_config(teacher))
    if prof.name == "book":
        export_record(rec, results_root() / "book")
    return rec


def model_of(record: dict):
    """The trained student of a record (eval mode, CPU)."""
    from kdlib.config import RunConfig

    return load_model(RunConfig.from_dict(record["config"]))


def distiller_of(record: dict):
    """The trained distiller of a record, extras included (attention modules, adapters, weighting state).

    Extras come from the run's last checkpoint in the cache, the teacher from its own run, and the
    student's weights are the ones the record scores: with ``ema_decay`` > 0 that is the moving average
    (what ``model_of`` loads), so maps, CAMs and accuracies all describe one model.
    """
    from kdlib.config import RunConfig
    from kdlib.distill import create_distiller
    from kdlib.models import create_model

    cfg = RunConfig.from_dict(record["config"])
    student = create_model(cfg.student, num_classes=num_classes(cfg))
    teacher = load_model(cfg.teacher) if cfg.teacher is not None else None
    distiller = create_distiller(cfg.method, student, teacher, **dict(cfg.method_options))
    ckpt = load_checkpoint(run_dir(cfg) / CHECKPOINT, record["hash"])
    distiller.load_trainable_state_dict(ckpt["distiller"])
    if cfg.optim.ema_decay > 0:
        distiller.student.load_state_dict(load_model(cfg).state_dict())
    return distiller.eval()


def table(groups: dict[str, list[dict]], highlight: str | None = None) -> str:
    """Markdown table: top-1 last and best (mean ± std over seeds), seeds, s/epoch."""
    rows = []
    for label, recs in groups.items():
        name = f"**{label}**" if label == highlight else label
        done = [r for r in recs if is_complete(r)]
        timed = [r["wall_time_s"] / len(r["history"]) for r in recs if r["history"]]
        rows.append({
            "run": name,
            "seeds": len(recs),
            "last": outcome([r["top1_last"] for r in done], recs),
            "best": outcome([r["top1_best"] for r in done], recs),
            "time": float(np.mean(timed)) if timed else float("nan"),
        })
    return markdown_table(rows, [("run", "run"), ("seeds", "seeds"), ("last", "top-1 last epoch (%)"),
                                 ("best", "top-1 best epoch (%)"), ("time", "s / epoch")])


def curve(records: list[dict], key: str) -> np.ndarray:
    """seeds × epochs array of a history key (``test_acc``, ``train_acc``) or a loss term."""
    def value(h):
        return h[key] if key in h else h["losses"].get(key, np.nan)
    length = max((len(r["history"]) for r in records), default=0)
    # A diverged run has fewer epochs: its missing epochs are NaN (matplotlib leaves a gap).
    return np.array([[value(h) for h in r["history"]] + [np.nan] * (length - len(r["history"])) for r in records],
                    dtype=float)


def plot_curves(groups: dict[str, list[dict]], key: str = "test_acc", ax=None, ylabel=None, *,
                legend: str | None = "right"):
    """Mean over seeds with a min–max band, one line per group, in the book's style (:mod:`kdlib.style`).

    The legend sits outside the axes (``legend`` = ``"right"`` or ``"below"``), so it covers no
    curve; ``legend=None`` leaves it out.
    """
    with style.book_style():
        if ax is None:
            _, ax = plt.subplots(figsize=style.figsize(1.0, aspect=2.0), dpi=style.DPI)
        for label, recs in groups.items():
            c = curve(recs, key)
            x = np.arange(1, c.shape[1] + 1)
            # Epochs nobody scored (eval_every > 1) are left out, so the evaluated ones join up; an epoch
            # that some seeds reached (a diverged run stops early) still counts for the others.
            scored = ~np.isnan(c).all(axis=0)
            x, c = x[scored], c[:, scored]
            mean = np.nanmean(c, axis=0) if c.size else c.sum(0)
            (line,) = ax.plot(x, mean, label=label, marker="o" if len(x) <= 5 else None)
            if len(recs) > 1 and c.size:  # the band in its line's colour (fill_between would take the next one)
                ax.fill_between(x, np.nanmin(c, axis=0), np.nanmax(c, axis=0), alpha=0.2, color=line.get_color(),
                                linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel or key)
        ax.grid(alpha=0.3)
        if legend is not None:
            style.legend_outside(ax, legend)
    return ax


def plot_loss_terms(records: list[dict], ax=None, title=None, *, legend: str | None = "right"):
    """Every loss term of one method over epochs (mean over seeds), log scale, legend outside the axes."""
    if not records or not records[0]["history"]:
        raise KDLibError("no completed epoch to plot: the run diverged in its first epoch")
    with style.book_style():
        if ax is None:
            _, ax = plt.subplots(figsize=style.figsize(1.0, aspect=2.0), dpi=style.DPI)
        for term in records[0]["history"][0]["losses"]:
            c = curve(records, term)
            ax.plot(np.arange(1, c.shape[1] + 1), c.mean(0), label=term, marker="o" if c.shape[1] == 1 else None)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("weighted loss term")
        ax.set_title(title or records[0]["config"]["method"])
        ax.grid(alpha=0.3)
        if legend is not None:
            style.legend_outside(ax, legend)
    return ax
