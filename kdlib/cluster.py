"""Calls run through submitit: concurrent local processes, or one Slurm job array.

Used by ``kdlib bench --executor local|slurm`` (kdlib.bench); submitit is the optional extra
``kdlib[cluster]``, so only that path imports this module. It knows nothing of runs: it takes a
picklable callable and a list of argument tuples, runs each call as one submitit job and yields
each job as it ends, with its return value or the job state that explains why there is none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

# Local runs have no wall-time limit unless one is asked for; submitit's local default is 2 minutes.
LOCAL_TIMEOUT_MIN = 60 * 24 * 30
# A run that reaches the Slurm time limit checkpoints and is requeued (bench.GridJob.checkpoint); allow
# many requeues, so that a 240-epoch run finishes on a partition with short limits too.
SLURM_MAX_REQUEUES = 20


@dataclass
class Ended:
    """A job that ended: its call's position, its return value, or why there is none."""

    index: int
    value: object = None
    failure: str | None = None  # when the job returned nothing: FAILED (it raised) or its state (TIMEOUT...)
    error: str = ""  # what the job's log says about it, one line
    log: str = ""  # the job's stdout and stderr files


def local_executor(folder: Path, timeout_min: int | None = None) -> submitit.LocalExecutor:
    """A LocalExecutor, not AutoExecutor(cluster="local"): only the former takes ``visible_gpus``,
    which gives each concurrent run its own GPU."""
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=timeout_min or LOCAL_TIMEOUT_MIN)
    return executor


def slurm_executor(folder: Path, *, partition: str | None, gpus_per_run: int, time_min: int,
                   array_parallelism: int, cpus_per_run: int | None = None,
                   job_name: str = "kdlib") -> submitit.AutoExecutor:
    """The executor of the grid's job array: one task per run, ``array_parallelism`` at a time."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=SLURM_MAX_REQUEUES)
    executor.update_parameters(
        name=job_name,
        timeout_min=time_min,
        gpus_per_node=gpus_per_run,
        cpus_per_task=cpus_per_run,  # None: the partition's default
        tasks_per_node=1,
        slurm_partition=partition,
        slurm_array_parallelism=array_parallelism,
    )
    return executor


def submit_array(executor: submitit.Executor, fn: Callable, calls: Sequence[tuple]) -> list[submitit.Job]:
    """One job per call; on Slurm one ``sbatch`` of a job array (``map_array``)."""
    return executor.map_array(fn, *zip(*calls, strict=True))


def run_local(fn: Callable, calls: Sequence[tuple], folder: Path, *, jobs: int, gpus: int = 0,
              timeout_min: int | None = None, poll_s: float = 0.5) -> Iterator[Ended]:
    """Run the calls as local processes, ``jobs`` at a time; slot ``k`` sees GPU ``k % gpus`` only.

    submitit's LocalExecutor starts every submitted job at once, so the window of ``jobs`` running
    processes is kept here (Slurm's ``array_parallelism`` does the same on a cluster).
    """
    executor = local_executor(folder, timeout_min)
    pending = list(enumerate(calls))
    running: dict[int, tuple[int, submitit.Job]] = {}  # slot -> (call index, job)
    try:
        while pending or running:
            for slot in range(jobs):
                if slot not in running and pending:
                    if gpus:
                        executor.update_parameters(gpus_per_node=1, visible_gpus=(slot % gpus,))
                    index, args = pending.pop(0)
                    running[slot] = (index, executor.submit(fn, *args))
            for slot, (index, job) in list(running.items()):
                if job.done():
                    del running[slot]
                    yield _set_aside(ended(index, job, disk_delay=False), job)
            time.sleep(poll_s)
    finally:  # stopped (Ctrl-C, an error): stop the runs still going; their checkpoints stay
        for _, job in running.values():
            job.cancel(check=False)


def _set_aside(result: Ended, job: submitit.Job) -> Ended:
    """Rename an ended local job's folder (named by its pid) to ``<pid>-call<index>``: a later job
    given the same pid would otherwise find this one's pickles in its folder and run or return them."""
    folder = job.paths.folder
    final = folder.with_name(f"{folder.name}-call{result.index}")
    folder.rename(final)
    result.log = result.log.replace(str(folder), str(final))
    return result


def as_completed(jobs: Sequence[submitit.Job], poll_s: float = 10.0) -> Iterator[Ended]:
    """Yield each job of ``jobs`` when it ends (submitit polls Slurm's ``sacct`` at its own pace)."""
    waiting = dict(enumerate(jobs))
    while waiting:
        for index, job in list(waiting.items()):
            if job.done():
                del waiting[index]
                yield ended(index, job)
        if waiting:
            time.sleep(poll_s)


def ended(index: int, job: submitit.Job, disk_delay: bool = True) -> Ended:
    """What an ended job left. ``disk_delay``: a missing result file may still be on its way (a
    cluster's shared disk; submitit waits for it); a local process that has exited wrote it or never will."""
    log = f"{job.paths.stdout} and {job.paths.stderr}"
    if not disk_delay and not job.paths.result_pickle.exists():
        state = str(job.state).upper()
        return Ended(index, failure=state, error=f"the job ended ({state}) without a result", log=log)
    try:
        return Ended(index, value=job.result(), log=log)
    except FailedJobError as e:  # the call raised (e.g. submitit's own "timed-out too many times")
        return Ended(index, failure="FAILED", error=_last_trace_line(str(e)), log=log)
    except UncompletedJobError:  # no result at all: killed, pre-empted, node failure...
        state = str(job.state).upper()
        return Ended(index, failure=state, error=f"the job ended ({state}) without a result", log=log)


def _last_trace_line(message: str) -> str:
    """The exception line of the traceback that submitit puts between two rules of dashes."""
    lines = [line for line in message.split("-" * 22)[1].splitlines() if line.strip()] if "-" * 22 in message else []
    return lines[-1].strip() if lines else message.splitlines()[0]
