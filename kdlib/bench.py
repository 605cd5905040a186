"""``kdlib bench``: a grid of methods × pairs × seeds, reusing cached runs, written to results/.

Each run's record is copied into ``results/<profile>/`` and the folder gets a summary table
(``summary.csv`` and ``summary.md``) with mean ± std of last- and best-epoch top-1, written once
at the end from the records.

Where the runs execute is a :class:`Launch`: ``inline`` (one after another in this process),
``local`` (concurrent processes on this machine) or ``slurm`` (one job array); the last two go
through submitit (kdlib.cluster). Every run goes through :func:`kdlib.train.run`, the run store,
whatever the executor: a finished run is reused, an interrupted one resumes from its checkpoint,
so a stopped grid resumes when the same command is given again. The grid's teachers run first,
then the students, so that no student job waits for a teacher that another job is training.
"""

from __future__ import annotations

import csv
import importlib
import os
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdlib import KDLibError
from kdlib.distill.base import NonFiniteLossError
from kdlib.grid import BOOK_GRID
from kdlib.grid import entry as grid_entry
from kdlib.profiles import PAPER_PAIRS, get_profile
from kdlib.results import SUMMARY_COLUMNS, markdown_table, summarise
from kdlib.run_store import cache_root, config_hash, export_record, find_record, load_records, results_root, run_name
from kdlib.train import EngineOptions, diverged_record, run

BOOK_METHODS = ("vanilla", "kd", "fitnets", "at", "afd", "sakd", "aftkd", "sam_kd", "lakd")  # the registry's methods
EXECUTORS = ("local", "slurm", "inline")
INSTALL_HINT = "pip install 'kdlib[cluster]'"


def grid(profile_name: str | None, methods=None, seeds=None):
    """The configs of the grid, in run order (all seeds of an entry together).

    ``methods`` are grid entries (:mod:`kdlib.grid`: ``"AT+KD"``, or a registry name such as ``"at"``);
    by default the whole book grid, controls included.
    """
    profile = get_profile(profile_name)
    entries = [grid_entry(m) for m in methods] if methods else list(BOOK_GRID)
    seeds = list(profile.seeds if seeds is None else seeds)
    pairs = PAPER_PAIRS if profile.name == "paper" else ((profile.teacher, profile.student),)
    return [
        profile.config(e.method, teacher=t, student=s, seed=seed, **e.options)
        for t, s in pairs
        for e in entries
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


# --- where the runs execute -------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """Where and how many at a time the runs of a grid execute (``kdlib bench --executor ...``)."""

    executor: str = "inline"  # inline | local | slurm
    jobs: int | None = None  # local: runs at once (default: one per GPU, else 1)
    partition: str | None = None  # slurm
    gpus_per_run: int | None = None  # slurm (default 1; 0 on a CPU partition)
    cpus_per_run: int | None = None  # slurm: the job's CPUs (default: the partition's); torch threads
    time_min: int | None = None  # per run; slurm default 24 h (a run that reaches it is requeued), local none
    array_parallelism: int | None = None  # slurm: array tasks at once (default: all)
    log_dir: Path | None = None  # default <cache>/jobs

    def check(self) -> None:
        if self.executor not in EXECUTORS:
            raise KDLibError(f"unknown executor {self.executor!r}; choose {', '.join(EXECUTORS)}")
        for name, value in (("jobs", self.jobs), ("gpus-per-run", self.gpus_per_run), ("time", self.time_min),
                            ("cpus-per-run", self.cpus_per_run), ("array-parallelism", self.array_parallelism)):
            if value is not None and value < (0 if name == "gpus-per-run" else 1):
                raise KDLibError(f"--{name} must be positive, got {value}")
        slurm_only = {"partition": self.partition, "gpus-per-run": self.gpus_per_run, "cpus-per-run": self.cpus_per_run,
                      "array-parallelism": self.array_parallelism}
        given = [f"--{k}" for k, v in slurm_only.items() if v is not None]
        if self.executor != "slurm" and given:
            raise KDLibError(f"{' '.join(given)}: only with --executor slurm")
        if self.executor != "local" and self.jobs is not None:
            raise KDLibError("--jobs: only with --executor local (Slurm: --array-parallelism)")

    def with_job_folder(self) -> Launch:
        """This command's own folder under ``log_dir`` (default ``<cache>/jobs``) for submitit's files;
        submitit makes one subfolder per job in it (``%j``)."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        return replace(self, log_dir=Path(self.log_dir or cache_root() / "jobs").expanduser().absolute() / stamp)

    def job_folder(self) -> Path:
        return Path(self.log_dir or cache_root() / "jobs") / "%j"


def _cluster():
    """kdlib.cluster, or the one-line error that says how to install submitit."""
    try:
        cluster = importlib.import_module("kdlib.cluster")
    except ImportError as e:
        raise KDLibError(f"the local and slurm executors need submitit ({e}): {INSTALL_HINT}, "
                         "or use --executor inline") from None
    return cluster


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _gpus(device: str | None) -> int:
    import torch

    return 0 if device == "cpu" else torch.cuda.device_count()


# --- one run ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How one run of the grid ended, as the job that ran it returns it."""

    name: str
    status: str  # complete | diverged | crashed | skipped | a job state (timeout, interrupted, ...)
    record: dict | None = None  # the complete or diverged record
    error: str = ""
    started: float = 0.0  # time.time() in the job
    ended: float = 0.0
    cached: bool = False  # the record existed before the grid asked for it
    log: str = ""  # the job's log files (local, slurm)

    @property
    def failed(self) -> bool:
        return self.status != "complete"


def train_one(cfg, options: EngineOptions, threads: int | None = None) -> Outcome:
    """``run(cfg)``, with every way it can end turned into an Outcome (the grid goes on)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    started, name = time.time(), run_name(cfg)
    try:
        record = run(cfg, options=options)
        return Outcome(record.get("name", name), "complete", record, started=started, ended=time.time())
    except NonFiniteLossError as e:  # a result to keep, unless it is the teacher's divergence
        record = diverged_record(e, cfg)
        if record is None:
            return Outcome(name, "diverged", error=f"its teacher diverged: {e}", started=started, ended=time.time())
        return Outcome(record.get("name", name), "diverged", record, record.get("error", str(e)), started=started,
                       ended=time.time())
    except Exception as e:  # crashed: recorded, and the other runs go on
        if not isinstance(e, KDLibError):  # a bug: its traceback goes to the job's log (or this terminal)
            traceback.print_exc()
        return Outcome(name, "crashed", error=f"{type(e).__name__}: {e}".splitlines()[0], started=started,
                       ended=time.time())


class GridJob:
    """The callable each submitit job runs: ``train_one`` in the job's process.

    ``checkpoint`` makes it requeueable: on a Slurm time-out or pre-emption submitit calls it and
    requeues the same call, and ``run`` resumes the run from its last epoch checkpoint. (submitit
    looks the method up by name, so this class needs no submitit import.)
    """

    def __call__(self, cfg, options: EngineOptions, threads: int | None = None) -> Outcome:
        return train_one(cfg, options, threads)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def execute(cfgs, launch: Launch, options: EngineOptions) -> Iterator[Outcome]:
    """Run ``cfgs`` where ``launch`` says; yield each Outcome as its run ends.

    Runs with a record already (complete, or diverged: ``run`` raises at once) are answered here,
    in this process; only the others become jobs.
    """
    todo = []
    for cfg in cfgs:
        if find_record(cfg) is not None or find_record(cfg, status="diverged") is not None:
            yield replace(train_one(cfg, options), cached=True)
        else:
            todo.append(cfg)
    if not todo:
        return
    if launch.executor == "inline":
        yield from (train_one(cfg, options) for cfg in todo)
        return
    cluster = _cluster()
    if launch.executor == "local":
        ended = _run_local(cluster, todo, launch, options)
    else:
        ended = cluster.as_completed(submit_slurm(cluster, todo, launch, options))
    for job in ended:
        yield _outcome(job, run_name(todo[job.index]))


def slurm_available() -> bool:
    """Whether this machine can submit Slurm jobs (without it submitit fails deep inside: "Could not detect srun")."""
    return shutil.which("sbatch") is not None


def submit_slurm(cluster, cfgs, launch: Launch, options: EngineOptions) -> list:
    """Submit ``cfgs`` as one Slurm job array; return submitit's jobs (one per run)."""
    if not slurm_available():
        raise KDLibError("--executor slurm needs Slurm: 'sbatch' is not on PATH here (submit from the cluster's "
                         "login node, or use --executor local)")
    executor = cluster.slurm_executor(
        launch.job_folder(), partition=launch.partition,
        gpus_per_run=1 if launch.gpus_per_run is None else launch.gpus_per_run,
        time_min=launch.time_min or 24 * 60, array_parallelism=launch.array_parallelism or len(cfgs),
        cpus_per_run=launch.cpus_per_run)
    calls = [(cfg, options, launch.cpus_per_run) for cfg in cfgs]  # torch threads: the task's CPUs
    return cluster.submit_array(executor, GridJob(), calls)


def _run_local(cluster, todo, launch: Launch, options: EngineOptions):
    gpus = _gpus(options.device)
    # One run per GPU; on a CPU one run per core, each with one torch thread: a run's floats then
    # depend on the CPU, not on how many cores the machine has (make book relies on it), and on the
    # project's 2-core machine two one-thread runs side by side train 1.1-1.4x the runs per minute of
    # one two-thread run (measured on the book's grid, v0.2.0 against the next). --jobs chooses otherwise.
    jobs = launch.jobs or (gpus if gpus else _cores())
    threads = max(1, _cores() // jobs)  # split the cores: concurrent runs must not oversubscribe them
    calls = [(cfg, options, threads) for cfg in todo]
    return cluster.run_local(GridJob(), calls, launch.job_folder(), jobs=jobs, gpus=gpus,
                             timeout_min=launch.time_min)


def _outcome(job, name: str) -> Outcome:
    """The Outcome a job returned (with the job's log), or one made from the job's state."""
    if job.failure is None:
        return replace(job.value, log=job.log)
    status = "crashed" if job.failure in ("FAILED", "FINISHED", "COMPLETED") else job.failure.lower()
    return Outcome(name, status, error=job.error, log=job.log)


# --- the grid -----------------------------------------------------------------------------------
@dataclass
class GridReport:
    rows: list[dict]  # the summary table
    outcomes: list[Outcome] = field(default_factory=list)  # teachers first, then the grid's runs


def run_grid(profile_name=None, methods=None, seeds=None, out=None, device=None, progress=True,
             launch: Launch | None = None) -> GridReport:
    """Run the grid; export each record into ``out`` (default ``results/<profile>``), then write the
    summary once. Raises KDLibError after writing it if any run failed, listing each failure."""
    launch = launch or Launch()
    launch.check()
    if launch.executor != "inline":
        _cluster()  # no submitit: say so before anything trains
        launch = launch.with_job_folder()
    if launch.executor == "local" and device and device.startswith("cuda:"):
        raise KDLibError(f"--device {device}: the local executor gives each run its own GPU; use --device cuda")
    profile = get_profile(profile_name)
    folder = Path(out) if out else results_root() / profile.name
    options = EngineOptions(device=device, progress=progress)
    # Once each: the vanilla run of a student that two pairs share is one run.
    cfgs = list({config_hash(c): c for c in grid(profile.name, methods, seeds)}.values())
    teachers = list({config_hash(c.teacher): c.teacher for c in cfgs if c.teacher is not None}.values())
    outcomes: list[Outcome] = []

    teacher_hash = {run_name(t): config_hash(t) for t in teachers}
    lost = {}  # teacher hash -> its failed Outcome: its students are skipped, the others go on
    for i, o in enumerate(execute(teachers, launch, options), 1):
        print(progress_line(o, i, len(teachers), "teacher "), flush=True)
        outcomes.append(o)
        if o.failed:
            lost[teacher_hash[o.name]] = o
    students = [c for c in cfgs if c.teacher is None or config_hash(c.teacher) not in lost]
    for c in cfgs:
        if c.teacher is not None and config_hash(c.teacher) in lost:
            teacher = lost[config_hash(c.teacher)]
            outcomes.append(Outcome(run_name(c), "skipped", error=f"its teacher {teacher.name} {teacher.status}"))
    for i, o in enumerate(execute(students, launch, options), 1):
        print(progress_line(o, i, len(students)), flush=True)
        outcomes.append(o)
        if o.record is not None:
            export_record(o.record, folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = write_summary(folder)
    print(markdown_table(rows, SUMMARY_COLUMNS))
    failures = [o for o in outcomes if o.failed]
    if failures:
        print("\nFailed runs:\n" + "\n".join(f"  {o.name}: {o.status}, {o.error}" + (f"; log {o.log}" if o.log else "")
                                              for o in failures))
        raise KDLibError(failure_message(failures))
    return GridReport(rows, outcomes)


def progress_line(o: Outcome, i: int, n: int, what: str = "") -> str:
    """``[i/n] name  top-1 ... %, time`` for a finished run, the status and error for the others."""
    if not o.failed:
        r = o.record
        how = "cached" if o.cached else f"{r.get('wall_time_s', 0.0):.1f} s"
        return f"[{i}/{n}] {what}{o.name}  top-1 {r['top1_last']:.2f} % (best {r['top1_best']:.2f}), {how}"
    log = f" (log {o.log})" if o.log else ""
    return f"[{i}/{n}] {what}{o.name}  {o.status.upper()}: {o.error}{log}"


def failure_message(failures: list[Outcome]) -> str:
    """One line: how many failed and how, then each run with its error and log."""
    if all(o.status == "diverged" and o.record is not None for o in failures):
        return (f"{len(failures)} run(s) diverged, summary written with them marked: "
                + "; ".join(f"{o.name} ({o.error})" for o in failures))
    counts = ", ".join(f"{n} {kind}" for kind, n in Counter(o.status for o in failures).items())
    return (f"{len(failures)} run(s) failed ({counts}), summary written from the others: "
            + "; ".join(f"{o.name} {o.status} ({o.error}" + (f"; log {o.log})" if o.log else ")") for o in failures))
