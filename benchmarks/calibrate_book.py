"""Calibrate the `book` profile on the embedded dataset (issues: engine item 6; evidence item 2).

Two rounds are kept in ``results/calibration_book.json``. ``candidates`` (the engine issue) were
judged on the test set. ``evidence`` candidates (the evidence issue) are judged on a **validation
split** (``eval_split="val"``, another stream of shapes images) that the reported numbers never
touch, on 5 seeds, with the weight average (EMA) scored and the raw weights beside it; their
targets are those of the evidence issue (:func:`evidence_targets`).

    python benchmarks/calibrate_book.py --round evidence --candidates "V1" --methods vanilla kd

Runs candidate settings through the real engine (cached, so re-running is free) and writes
``results/calibration_book.json``: per candidate, the teacher's top-1, vanilla and KD top-1 per
seed, wall time per run, and the four targets (run <= 4 min, teacher >= vanilla + 5, vanilla std
<= 1.5, KD >= vanilla + 1).

    python benchmarks/calibrate_book.py --candidates B C --methods vanilla
    python benchmarks/calibrate_book.py --candidates "lr 0.3, difficulty 0.75" --methods vanilla kd
    python benchmarks/calibrate_book.py --candidates "lr 0.3, difficulty 0.75" --methods vanilla --seeds 3 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from kdlib.profiles import PROFILE_TABLE, Profile
from kdlib.run_store import results_root, write_json_atomic
from kdlib.train import EngineOptions, run

# The book profile as the two calibration rounds knew it (the engine round's setting: 4,000 training
# and 2,000 test images, 20 epochs, scored every epoch on the raw weights). Frozen here so that the
# candidates below keep their identities now that the `book` profile is the evidence round's V2.
BOOK = dataclasses.replace(
    PROFILE_TABLE["book"],
    data=dataclasses.replace(PROFILE_TABLE["book"].data, train_size=4000, test_size=2000),
    teacher_optim=dataclasses.replace(PROFILE_TABLE["book"].teacher_optim, eval_every=1),
    student_optim=dataclasses.replace(PROFILE_TABLE["book"].student_optim, epochs=20, ema_decay=0.0, eval_every=1),
)


def candidate(train_size: int, student_epochs: int, teacher_epochs: int, teacher: str = "resnet20",
              difficulty: float = 1.0, student_lr: float | None = None, **student_optim) -> Profile:
    """The book profile with other sizes; ``student_optim`` overrides other fields of the student's optimiser."""
    data = dataclasses.replace(BOOK.data, train_size=train_size, difficulty=difficulty)
    lr = 0.1 if student_lr is None else student_lr  # the first book setting's rate
    return dataclasses.replace(
        BOOK, data=data, teacher=teacher,
        student_optim=dataclasses.replace(BOOK.student_optim, epochs=student_epochs, lr=lr, **student_optim),
        teacher_optim=dataclasses.replace(BOOK.teacher_optim, epochs=teacher_epochs),
    )


CANDIDATES = {
    # The first book setting (difficulty 1, student lr 0.1); the engine round chose
    # "lr 0.3, difficulty 0.75" below, the evidence round then V2 (the `book` profile now).
    "first book setting": candidate(4000, 20, 30, "resnet14"),
    # CALIBRATION.md's recipe: 2,000 images x 60 epochs (120k samples per student run).
    "A": candidate(2000, 60, 90),
    # Same sample budget, more distinct images.
    "B": candidate(4000, 30, 45),
    "C": candidate(8000, 15, 23),
    # Shorter runs, for the time budget of `make book`.
    "D": candidate(4000, 20, 45),
    "E": candidate(8000, 10, 23),
    # The book setting with another student learning rate (the teacher is the book's own run): the
    # vanilla student is still learning at its last epoch, so its spread follows its speed.
    "lr 0.05": candidate(4000, 20, 30, "resnet14", student_lr=0.05),
    "lr 0.2": candidate(4000, 20, 30, "resnet14", student_lr=0.2),
    "lr 0.4": candidate(4000, 20, 30, "resnet14", student_lr=0.4),
    # Session 16: other levers on the vanilla student's spread (same budget per run).
    "lr 0.3": candidate(4000, 20, 30, "resnet14", student_lr=0.3),
    "lr 0.4, warm-up 15 %": candidate(4000, 20, 30, "resnet14", student_lr=0.4, warmup_frac=0.15),
    "lr 0.2, weight decay 1e-4": candidate(4000, 20, 30, "resnet14", student_lr=0.2, weight_decay=1e-4),
    "lr 0.2, difficulty 0.75": candidate(4000, 20, 30, "resnet14", difficulty=0.75, student_lr=0.2),
    "lr 0.4, difficulty 0.75": candidate(4000, 20, 30, "resnet14", difficulty=0.75, student_lr=0.4),
    "difficulty 0.75": candidate(4000, 20, 30, "resnet14", difficulty=0.75),
    "difficulty 0.5": candidate(4000, 20, 30, "resnet14", difficulty=0.5),
    "lr 0.2, difficulty 0.5": candidate(4000, 20, 30, "resnet14", difficulty=0.5, student_lr=0.2),
    "lr 0.3, difficulty 0.75": candidate(4000, 20, 30, "resnet14", difficulty=0.75, student_lr=0.3),
}


def evidence_candidate(difficulty: float = 0.75, student_lr: float = 0.3, train_size: int = 4000,
                       student_epochs: int = 20, teacher: str = "resnet14", teacher_epochs: int = 30,
                       val_size: int = 5000, ema_decay: float = 0.99, eval_every: int = 5) -> Profile:
    """A book setting scored on the validation split (``val_size`` images), EMA on (raw weights recorded too).

    The teacher is scored and used without an average. A first try with decay 0.998 (a horizon of
    about 500 of the student's 1,250 steps) lagged far behind the raw weights (vanilla seed 0: 74.8 %
    against 92.8 % raw on the validation split, teacher 98.08 against 98.48): the average still held
    weights from early training. 0.99 averages about the last 100 steps (1.6 epochs).
    """
    data = dataclasses.replace(BOOK.data, train_size=train_size, test_size=val_size, difficulty=difficulty,
                               eval_split="val")
    scoring = {"ema_decay": ema_decay, "eval_every": eval_every}
    return dataclasses.replace(
        BOOK, data=data, teacher=teacher,
        student_optim=dataclasses.replace(BOOK.student_optim, epochs=student_epochs, lr=student_lr, **scoring),
        teacher_optim=dataclasses.replace(BOOK.teacher_optim, epochs=teacher_epochs, eval_every=eval_every),
    )


EVIDENCE = {
    # V1: the book setting of the engine issue, now scored by an EMA on 5,000 validation images.
    "V1": evidence_candidate(),
    # V2: twice the distinct images, half the epochs (same steps, same cost).
    "V2": evidence_candidate(train_size=8000, student_epochs=10),
    # V3: harder images (more headroom below the teacher), same budget.
    "V3": evidence_candidate(difficulty=1.0),
    # V4: a gentler rate at difficulty 0.75.
    "V4": evidence_candidate(student_lr=0.2),
}


def run_candidate(prof: Profile, entry: dict, methods, seeds, opts: EngineOptions, save) -> None:
    """Train (or read from the cache) the teacher and ``methods`` × ``seeds`` of one candidate into ``entry``."""
    t = run(prof.teacher_config(), options=opts)  # cached after the first candidate with this teacher
    entry["teacher"] = {"top1_last": t["top1_last"], "top1_last_raw": t.get("top1_last_raw"),
                        "wall_time_s": t["wall_time_s"], "record": t["name"], "precision": t["precision"]}
    for method in methods:
        rows = {r["seed"]: r for r in entry.get(method, {}).get("runs", [])}
        for s in seeds:
            r = run(prof.config(method, seed=s), options=opts)
            rows[s] = {"seed": s, "top1_last": r["top1_last"], "top1_last_raw": r.get("top1_last_raw"),
                       "top1_best": r["top1_best"], "wall_time_s": round(r["wall_time_s"], 1), "record": r["name"],
                       "status": r["status"], "precision": r["precision"]}
            entry[method] = {"runs": [rows[k] for k in sorted(rows)]}
            save()


def evidence_targets(entry: dict) -> dict:
    """The evidence issue's targets on what has been measured, for the EMA score and for the raw weights."""
    from kdlib.stats import compare

    res = {}
    for score in ("top1_last", "top1_last_raw"):
        out = {}
        van = entry.get("vanilla", {}).get("runs", [])
        if len(van) >= 2:
            v = [r[score] for r in van]
            out["vanilla_mean"], out["vanilla_std"] = statistics.fmean(v), statistics.stdev(v)
            out["vanilla_std_le_1.0"] = out["vanilla_std"] <= 1.0
            teacher = entry["teacher"]["top1_last" if score == "top1_last" else "top1_last_raw"]
            if teacher is not None:
                out["teacher_minus_vanilla"] = teacher - out["vanilla_mean"]
                out["teacher_minus_vanilla_ge_6"] = out["teacher_minus_vanilla"] >= 6.0
        kd = entry.get("kd", {}).get("runs", [])
        if len(kd) >= 2 and len(van) >= 2:
            c = compare(kd, van, key=score, label="kd − vanilla")
            out["kd_minus_vanilla"] = {"mean": c.mean, "low": c.low, "high": c.high, "half_width": (c.high - c.low) / 2,
                                       "r": c.r, "n": c.n, "verdict": c.verdict}
            out["kd_interval_within_1"] = (c.high - c.low) / 2 <= 1.0
        res[score] = out
    times = [r["wall_time_s"] for m in ("vanilla", "kd") for r in entry.get(m, {}).get("runs", [])]
    if times:
        res["max_student_run_s"] = max(times)
    return res


def main_evidence(args) -> None:
    out = Path(args.out)
    summary = json.loads(out.read_text()) if out.exists() else {"candidates": {}}
    opts = EngineOptions(device="cpu")
    for name in args.candidates:
        prof = EVIDENCE[name]
        entry = summary.setdefault("evidence", {}).setdefault(name, {})
        entry["setting"] = {"train_size": prof.data.train_size, "val_size": prof.data.test_size,
                            "eval_split": prof.data.eval_split, "difficulty": prof.data.difficulty,
                            "student_epochs": prof.student_optim.epochs, "student_lr": prof.student_optim.lr,
                            "ema_decay": prof.student_optim.ema_decay, "eval_every": prof.student_optim.eval_every,
                            "teacher": prof.teacher, "teacher_epochs": prof.teacher_optim.epochs,
                            "student": prof.student}
        run_candidate(prof, entry, args.methods, args.seeds, opts, lambda: write_json_atomic(out, summary))
        entry["targets"] = evidence_targets(entry)
        write_json_atomic(out, summary)
        print(name, json.dumps(entry["targets"], indent=1), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--round", choices=("engine", "evidence"), default="evidence")
    ap.add_argument("--candidates", nargs="+", default=["V1"])
    ap.add_argument("--methods", nargs="+", default=["vanilla", "kd"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default=str(results_root() / "calibration_book.json"))
    args = ap.parse_args()
    if args.round == "evidence":
        if args.seeds == [0, 1, 2]:
            args.seeds = [0, 1, 2, 3, 4]  # the evidence issue's targets are on five seeds
        return main_evidence(args)

    out = Path(args.out)
    summary = json.loads(out.read_text()) if out.exists() else {"candidates": {}}
    opts = EngineOptions(device="cpu", precision="fp32")  # the engine round was measured in fp32
    for name in args.candidates:
        prof = CANDIDATES[name]
        entry = summary["candidates"].setdefault(name, {})
        entry["setting"] = {"train_size": prof.data.train_size, "test_size": prof.data.test_size,
                            "student_epochs": prof.student_optim.epochs, "student_lr": prof.student_optim.lr,
                            "teacher_epochs": prof.teacher_optim.epochs, "teacher": prof.teacher,
                            "student": prof.student, "difficulty": prof.data.difficulty,
                            "student_warmup_frac": prof.student_optim.warmup_frac,
                            "student_weight_decay": prof.student_optim.weight_decay}
        t = run(prof.teacher_config(), options=opts)  # cached after the first candidate with this teacher
        entry["teacher"] = {"top1_last": t["top1_last"], "wall_time_s": t["wall_time_s"], "record": t["name"]}
        for method in args.methods:
            # Seeds asked for now are added to those measured before (a check with more seeds keeps
            # the first three, on which the targets are judged).
            old = entry.get(method, {})
            measured = {s: (old["top1_last"][i], old["top1_best"][i], old["wall_time_s"][i], old["records"][i])
                        for i, s in enumerate(old.get("seeds", []))}
            for s in args.seeds:
                r = run(prof.config(method, seed=s), options=opts)
                measured[s] = (r["top1_last"], r["top1_best"], round(r["wall_time_s"], 1), r["name"])
            seeds = sorted(measured)
            entry[method] = {
                "seeds": seeds,
                **{key: [measured[s][i] for s in seeds]
                   for i, key in enumerate(("top1_last", "top1_best", "wall_time_s", "records"))},
            }
            write_json_atomic(out, summary)
        entry["targets"] = targets(entry)
        write_json_atomic(out, summary)
        print(name, json.dumps(entry["targets"], indent=1))


def targets(entry: dict) -> dict:
    """The four targets of the engine issue, evaluated on what has been measured."""
    res = {}
    if "vanilla" in entry:
        first3 = [v for s, v in zip(entry["vanilla"]["seeds"], entry["vanilla"]["top1_last"]) if s in (0, 1, 2)]
        v = first3 or entry["vanilla"]["top1_last"]
        res["vanilla_mean"] = statistics.fmean(v)
        res["vanilla_std"] = statistics.stdev(v) if len(v) > 1 else None
        res["vanilla_std_le_1.5"] = res["vanilla_std"] is not None and res["vanilla_std"] <= 1.5
        every = entry["vanilla"]["top1_last"]
        if len(every) > len(v):  # a check on more seeds than the three the target names
            res["vanilla_seeds_all"] = len(every)
            res["vanilla_mean_all"] = statistics.fmean(every)
            res["vanilla_std_all"] = statistics.stdev(every)
    if "kd" in entry and "vanilla" in entry:
        res["kd_mean"] = statistics.fmean(entry["kd"]["top1_last"])
        res["kd_minus_vanilla"] = res["kd_mean"] - res["vanilla_mean"]
        res["kd_ge_vanilla_plus_1"] = res["kd_minus_vanilla"] >= 1.0
    if "teacher" in entry and "vanilla" in entry:
        res["teacher_minus_vanilla"] = entry["teacher"]["top1_last"] - res["vanilla_mean"]
        res["teacher_ge_vanilla_plus_5"] = res["teacher_minus_vanilla"] >= 5.0
    times = [t for m in ("vanilla", "kd") if m in entry for t in entry[m]["wall_time_s"]]
    if times:
        res["max_student_run_s"] = max(times)
        res["student_run_le_240s"] = max(times) <= 240
    return res


if __name__ == "__main__":
    main()
