"""`kdlib bench` through submitit: concurrent local runs, the Slurm job array, failures, no submitit.

The local tests start real processes (submitit's LocalExecutor) training smoke runs on the CPU.
The Slurm tests run without a cluster: submitit's own mock of sbatch/sacct
(``submitit.slurm.test_slurm.mocked_slurm``) takes the submission, and the sbatch script it would
have sent is read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kdlib.bench as bench
from kdlib import KDLibError
from kdlib.bench import Launch, Outcome, run_grid
from kdlib.cli import build_parser, main
from kdlib.run_store import config_hash, run_dir, run_name

REPO = Path(__file__).resolve().parent.parent
GRID = dict(methods=["vanilla", "kd"], seeds=[0, 1])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private run cache, seen by this process and by the job processes it starts."""
    root = tmp_path / "cache"
    monkeypatch.setenv("KDLIB_CACHE", str(root))
    monkeypatch.setenv("KDLIB_PROFILE", "smoke")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the job processes import this tree's kdlib
    return root


def max_overlap(intervals) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def fake_record(cfg, **kw) -> dict:
    rec = {"name": run_name(cfg), "hash": config_hash(cfg), "config": cfg.to_dict(), "status": "complete",
           "seed": cfg.seed, "top1_last": 50.0, "top1_best": 51.0, "wall_time_s": 1.0, "history": [],
           "peak_memory": {"bytes": 1}}
    return {**rec, **kw}


# --- the local executor, for real ---------------------------------------------------------------
@pytest.mark.slow
def test_local_executor_runs_a_4_run_grid_2_at_a_time(cache, tmp_path, capsys):
    out = tmp_path / "out"
    report = run_grid("smoke", **GRID, out=out, progress=False, launch=Launch("local", jobs=2))
    names = {run_name(c) for c in bench.grid("smoke", **GRID)}
    assert {p.stem for p in out.glob("*.json")} == names  # the 4 records, nothing else
    assert sorted(p.name for p in out.glob("summary*")) == ["summary.csv", "summary.md"]
    assert {(r["method"], r["seeds"]) for r in report.rows} == {("vanilla", 2), ("kd", 2)}
    assert len((out / "summary.csv").read_text().splitlines()) == 3

    teacher, *students = report.outcomes
    assert teacher.name.startswith("vanilla-resnet8-s0") and teacher.status == "complete"
    assert {o.name for o in students} == names and all(o.status == "complete" for o in students)
    assert max_overlap([(o.started, o.ended) for o in students]) <= 2  # never more than --jobs at once
    for o in students:  # each run had its own job, with its log, and half the cores
        stdout, stderr = (Path(p) for p in o.log.split(" and "))
        assert stdout.exists() and stderr.exists() and stdout.parent != tmp_path
        expected_threads = max(1, len(os.sched_getaffinity(0)) // 2)
        assert o.record["device"].endswith(f"{expected_threads} threads"), o.record["device"]
        assert json.loads((out / f"{o.name}.json").read_text())["created"] == o.record["created"]
    assert len({Path(o.log.split(" and ")[0]).parent for o in students}) == 4

    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 5 and all("top-1" in line for line in progress)
    assert sum(line.startswith("| kd |") or line.startswith("| vanilla |") for line in lines) == 2

    # The same command again: every run is reused, nothing is submitted.
    again = run_grid("smoke", **GRID, out=out, progress=False, launch=Launch("local", jobs=2))
    assert all(o.cached and not o.log for o in again.outcomes)
    created = {o.name: o.record["created"] for o in students}
    assert {o.name: o.record["created"] for o in again.outcomes[1:]} == created


@pytest.mark.slow
def test_the_same_grid_started_twice_at_once_trains_each_run_once(cache, tmp_path):
    # Passes once kdlib.train.run holds a per-run file lock (a second process asking for a run that
    # is being trained waits, then reuses it). Each process exports the record its own job got: had a
    # run been trained twice, the two copies would differ (creation stamp, measured times).
    def start(out):
        cmd = [sys.executable, "-m", "kdlib", "bench", "--profile", "smoke", "--methods", *GRID["methods"],
               "--seeds", *map(str, GRID["seeds"]), "--executor", "local", "--jobs", "2", "--quiet", "--out", str(out)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(tmp_path / "a"), start(tmp_path / "b")]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout + stderr
    for cfg in bench.grid("smoke", **GRID):
        name = run_name(cfg)
        a, b = (json.loads((tmp_path / side / f"{name}.json").read_text()) for side in ("a", "b"))
        stored = json.loads((run_dir(cfg, cache) / "record.json").read_text())
        assert a == b == stored, f"{name} was trained more than once"


@pytest.mark.slow
def test_each_local_slot_sees_its_own_gpu(tmp_path):
    # No GPU needed: the slot's GPU reaches the job as CUDA_VISIBLE_DEVICES, set by submitit.
    from kdlib import cluster

    read = ("__import__('os').environ['CUDA_VISIBLE_DEVICES']",)
    seen = {e.index: e.value for e in cluster.run_local(eval, [read] * 3, tmp_path / "a" / "%j", jobs=3, gpus=2)}
    assert seen == {0: "0", 1: "1", 2: "0"}  # slot k: GPU k % 2
    seen = [e.value for e in cluster.run_local(eval, [read], tmp_path / "b" / "%j", jobs=1, gpus=0)]
    assert seen == [""]  # a CPU grid hides the GPUs


# --- failures ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_jobs_that_die_or_raise_are_reported_and_the_others_return(tmp_path):
    # Real local processes, without torch: eval of three expressions, two at a time.
    from kdlib import cluster

    calls = [("16 ** 0.5",), ("__import__('os')._exit(3)",), ("int('x')",)]
    ended = {e.index: e for e in cluster.run_local(eval, calls, tmp_path / "%j", jobs=2)}
    assert ended[0].value == 4.0 and ended[0].failure is None
    assert ended[1].failure == "FINISHED" and "without a result" in ended[1].error  # the process died
    assert ended[2].failure == "FAILED" and ended[2].error == "ValueError: invalid literal for int() with base 10: 'x'"
    assert bench._outcome(ended[1], "r1").status == bench._outcome(ended[2], "r2").status == "crashed"
    for e in ended.values():  # each job's folder is renamed after its call: a reused pid cannot find it
        stdout, stderr = (Path(p) for p in e.log.split(" and "))
        assert stdout.exists() and stderr.exists() and stdout.parent.name.endswith(f"-call{e.index}")
    assert "ValueError" in Path(ended[2].log.split(" and ")[1]).read_text()


def test_a_crashed_and_a_diverged_run_are_listed_and_the_others_kept(tmp_path, monkeypatch, capsys):
    from kdlib.distill import NonFiniteLossError

    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))

    def fake_run(cfg, options=None):
        if cfg.method == "kd" and cfg.seed == 1:
            raise NonFiniteLossError("loss term 'kd' is nan at step 3", record=fake_record(
                cfg, status="diverged", top1_last=None, top1_best=None, diverged_epoch=1, error="nan at step 3"))
        if cfg.method == "vanilla" and cfg.seed == 1 and cfg.student == "resnet8" and cfg.optim.epochs == 1:
            raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
        return fake_record(cfg)

    monkeypatch.setattr(bench, "run", fake_run)
    with pytest.raises(KDLibError) as err:
        run_grid("smoke", **GRID, out=tmp_path / "out", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("2 run(s) failed (1 crashed, 1 diverged), summary written from the others: ")
    assert "RuntimeError: CUDA error: an illegal memory access" in message and "second line" not in message
    assert "nan at step 3" in message
    # The diverged record is kept (the summary marks it); the crashed run has none.
    assert len(list((tmp_path / "out").glob("*-s*.json"))) == 3
    assert "1 diverged" in (tmp_path / "out" / "summary.md").read_text()
    printed = capsys.readouterr()
    assert "Failed runs:" in printed.out and "CRASHED: RuntimeError" in printed.out
    assert "Traceback" in printed.err  # a bug's traceback is kept (here: this terminal)


def test_a_failed_teacher_skips_its_students_and_does_not_stop_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))

    def fake_run(cfg, options=None):
        if cfg.optim.epochs == 2:  # the smoke teacher
            raise KDLibError("CIFAR-100 not found in /nowhere")
        return fake_record(cfg)

    monkeypatch.setattr(bench, "run", fake_run)
    with pytest.raises(KDLibError, match=r"3 run\(s\) failed \(1 crashed, 2 skipped\)"):
        run_grid("smoke", **GRID, out=tmp_path / "out", progress=False)
    assert {p.name.split("-")[0] for p in (tmp_path / "out").glob("*-s*.json")} == {"vanilla"}


@pytest.fixture
def sbatch_on_path(monkeypatch):
    """submitit's mock answers sbatch/sacct; kdlib's up-front check looks for sbatch on PATH."""
    monkeypatch.setattr(bench, "slurm_available", lambda: True)


def test_slurm_without_slurm_is_one_line_before_anything_trains(monkeypatch):
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)  # no sbatch on this machine's PATH
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("trained before refusing"))
    cfgs = bench.grid("smoke", ["vanilla"], [0])
    with pytest.raises(KDLibError, match="needs Slurm: 'sbatch' is not on PATH"):
        bench.submit_slurm(bench._cluster(), cfgs, Launch("slurm"), bench.EngineOptions())


def test_a_slurm_job_without_a_result_is_listed_with_its_state_and_log(tmp_path, monkeypatch, sbatch_on_path):
    from submitit.core.utils import cloudpickle_dump
    from submitit.slurm.slurm import SlurmJob
    from submitit.slurm.test_slurm import mocked_slurm

    monkeypatch.setattr(SlurmJob, "_results_timeout_s", 0)  # no result file: do not wait for a slow disk
    cfgs = bench.grid("smoke", ["vanilla"], [0, 1])
    launch = Launch("slurm", partition="gpu", log_dir=tmp_path).with_job_folder()
    with mocked_slurm() as mock:
        jobs = bench.submit_slurm(bench._cluster(), cfgs, launch, bench.EngineOptions())
        done = Outcome(run_name(cfgs[0]), "complete", fake_record(cfgs[0]))
        cloudpickle_dump(("success", done), jobs[0].paths.result_pickle)
        mock.set_job_state(mock.last_job, "TIMEOUT", array=2)
        outcomes = [bench._outcome(e, run_name(cfgs[e.index])) for e in bench._cluster().as_completed(jobs, 0)]
    by_name = {o.name: o for o in outcomes}
    assert by_name[run_name(cfgs[0])].status == "complete"
    lost = by_name[run_name(cfgs[1])]
    assert lost.status == "timeout" and "without a result" in lost.error
    assert str(jobs[1].paths.stdout) in lost.log and str(jobs[1].paths.stderr) in lost.log


# --- the Slurm job array, without a cluster -------------------------------------------------------
def test_slurm_submits_one_array_with_the_asked_resources(tmp_path, sbatch_on_path):
    from submitit.slurm.test_slurm import mocked_slurm

    cfgs = bench.grid("smoke", **GRID)
    launch = Launch("slurm", partition="gpu-a100", gpus_per_run=1, cpus_per_run=10, time_min=90,
                    array_parallelism=2, log_dir=tmp_path / "logs").with_job_folder()
    with mocked_slurm():
        jobs = bench.submit_slurm(bench._cluster(), cfgs, launch, bench.EngineOptions(device="cuda"))
    scripts = list((tmp_path / "logs").rglob("*_submission.sh"))
    assert len(jobs) == 4 and len(scripts) == 1  # one sbatch: a job array of 4 tasks
    flags = {line for line in scripts[0].read_text().splitlines() if line.startswith("#SBATCH")}
    for flag in ("--partition=gpu-a100", "--array=0-3%2", "--gpus-per-node=1", "--cpus-per-task=10", "--time=90",
                 "--ntasks-per-node=1", "--nodes=1", "--job-name=kdlib"):
        assert f"#SBATCH {flag}" in flags, (flag, sorted(flags))
    output = next(f for f in flags if f.startswith("#SBATCH --output="))
    assert output.startswith(f"#SBATCH --output={launch.log_dir}/%A_%a/")
    for cfg, job in zip(cfgs, jobs, strict=True):  # each task runs its own config, with the task's CPUs
        call = job.submission()
        assert isinstance(call.function, bench.GridJob)
        assert run_name(call.args[0]) == run_name(cfg) and call.args[1].device == "cuda" and call.args[2] == 10
        assert hasattr(call.function, "checkpoint")  # requeued on time-out / pre-emption


def test_slurm_defaults_one_gpu_a_day_and_the_whole_array_at_once(tmp_path, sbatch_on_path):
    from submitit.slurm.test_slurm import mocked_slurm

    launch = Launch("slurm", log_dir=tmp_path).with_job_folder()
    with mocked_slurm():
        bench.submit_slurm(bench._cluster(), bench.grid("smoke", ["vanilla"], [0, 1, 2]), launch, bench.EngineOptions())
    text = next(tmp_path.rglob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2%3" in text and "#SBATCH --gpus-per-node=1" in text and "#SBATCH --time=1440" in text
    assert "--partition" not in text and "--cpus-per-task" not in text


@pytest.mark.parametrize("gpus,cores,jobs,want", [
    (0, 2, None, (2, 1)),   # a CPU: one run per core, one torch thread each
    (0, 16, None, (16, 1)),
    (0, 2, 1, (1, 2)),      # --jobs 1: one run with the machine's threads
    (4, 32, None, (4, 8)),  # one run per GPU, the cores split between them
])
def test_local_default_jobs_and_threads(monkeypatch, gpus, cores, jobs, want):
    seen = {}

    class FakeCluster:
        @staticmethod
        def run_local(fn, calls, folder, *, jobs, gpus, timeout_min):
            seen.update(jobs=jobs, threads={c[2] for c in calls})
            return []

    monkeypatch.setattr(bench, "_gpus", lambda device: gpus)
    monkeypatch.setattr(bench, "_cores", lambda: cores)
    bench._run_local(FakeCluster, [object(), object()], Launch("local", jobs=jobs), bench.EngineOptions())
    assert (seen["jobs"], seen["threads"]) == (want[0], {want[1]})


# --- the command line -----------------------------------------------------------------------------
def test_bench_options_reach_the_launch(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "run_grid", lambda *a, **kw: seen.update(kw))
    args = build_parser().parse_args(
        ["bench", "--profile", "paper", "--executor", "slurm", "--partition", "gpu", "--gpus-per-run", "2",
         "--cpus-per-run", "8", "--time", "600", "--array-parallelism", "16", "--log-dir", "/shared/logs"])
    assert args.func(args) == 0
    assert seen["launch"] == Launch("slurm", partition="gpu", gpus_per_run=2, cpus_per_run=8, time_min=600,
                                    array_parallelism=16, log_dir="/shared/logs")
    args = build_parser().parse_args(["bench"])
    args.func(args)
    assert seen["launch"] == Launch("local")  # the default: local processes, one per GPU (one per core on a CPU)


@pytest.mark.parametrize("argv,needle", [
    (["--executor", "local", "--partition", "gpu"], "--partition: only with --executor slurm"),
    (["--executor", "inline", "--jobs", "2"], "--jobs: only with --executor local"),
    (["--executor", "local", "--jobs", "0"], "--jobs must be positive"),
    (["--executor", "local", "--device", "cuda:1"], "each run its own GPU"),
])
def test_bad_bench_options_are_one_line_errors(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(bench, "run", lambda *a, **kw: pytest.fail("trained despite a bad option"))
    rc = main(["bench", "--profile", "smoke", "--methods", "vanilla", "--seeds", "0", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_without_submitit_bench_says_how_to_install_it(executor, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    monkeypatch.delitem(sys.modules, "kdlib.cluster", raising=False)
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))
    rc = main(["bench", "--profile", "smoke", "--executor", executor, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("kdlib: error: ") and "pip install 'kdlib[cluster]'" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # nothing ran


def test_inline_needs_no_submitit(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    monkeypatch.delitem(sys.modules, "kdlib.cluster", raising=False)
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "run", lambda cfg, options=None: fake_record(cfg))
    report = run_grid("smoke", **GRID, out=tmp_path / "out", progress=False, launch=Launch("inline"))
    assert [o.status for o in report.outcomes] == ["complete"] * 5 and len(report.rows) == 2


def test_a_run_that_two_pairs_share_is_run_once(tmp_path, monkeypatch):
    # paper: resnet20 is the student of two pairs; its vanilla run has no teacher, so it is one run.
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))
    asked = []
    monkeypatch.setattr(bench, "run", lambda cfg, options=None: asked.append(config_hash(cfg)) or fake_record(cfg))
    report = run_grid("paper", ["vanilla"], [0], out=tmp_path / "out", progress=False)
    students = {s for _, s in bench.PAPER_PAIRS}
    assert len(asked) == len(set(asked)) == len(students) == len(report.outcomes) == 9


def test_the_book_grid_pairs_every_method_with_the_reference_of_its_logit_terms():
    from kdlib.distill import resolve_options
    from kdlib.grid import BOOK_GRID, comparisons, entry

    assert len(BOOK_GRID) == 11 and len(comparisons()) == 10
    for e, ref in comparisons():
        opts = resolve_options(e.method, e.options)
        has_kd = opts.get("kd_weight", 0) > 0 or e.method == "aftkd"  # AFT-KD's KD scale is λ_kd
        # A method with a logit KD term is compared with KD, one without with vanilla (KD itself too).
        assert ref.label == ("KD" if has_kd and e.method != "kd" else "vanilla"), e.label
    assert entry("AT+KD").method == "at_kd" and entry("at").method == "at"
    cfgs = bench.grid("smoke", methods=["AT+KD", "at"], seeds=[0])
    assert [dict(c.method_options).get("kd_weight") for c in cfgs] == [0.9, None]
    with pytest.raises(KDLibError, match="no grid entry 'magic'"):
        entry("magic")
