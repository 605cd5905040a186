"""The training engine: fit, evaluate, checkpoint, resume, cache.

``run(cfg)`` is the entry point every notebook and the CLI use: it returns the cached record of a
finished run with the same identity, resumes an interrupted one from its last checkpoint, or
trains it from scratch. Teachers are trained by the same engine (a teacher is a ``vanilla`` run),
so a student run first asks for its teacher's run. Everything a user can get wrong (options,
epochs, device, dataset, the pairing) is checked before the teacher trains.

Determinism: the data order and augmentation of epoch ``e`` are a pure function of (seed, e)
(``set_epoch``), and the checkpoint holds the torch RNG state for everything else (dropout in
SAKD), so a run killed at any point and resumed ends with the same weights as one that was not.

Records, folders, checkpoints and the run lock live in :mod:`kdlib.run_store`; the arithmetic
(fp32, bf16 or fp16 autocast, memory layout) in :mod:`kdlib.precision`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kdlib import KDLibError, distributed
from kdlib.config import RunConfig
from kdlib.data import get_loaders
from kdlib.data.loaders import DATASETS
from kdlib.distill import create_distiller
from kdlib.distill.base import NonFiniteLossError
from kdlib.epoch import evaluate, train_epoch
from kdlib.models import create_model
from kdlib.optim import lr_factor, make_optimizer
from kdlib.precision import Precision, resolve_precision
from kdlib.run_store import (
    CHECKPOINT,
    RECORD,
    WEIGHTS,
    config_hash,
    device_description,
    find_record,
    load_checkpoint,
    load_weights,
    run_dir,
    run_lock,
    run_name,
    save_atomic,
    versions,
    write_json_atomic,
)

__all__ = ["CHECKPOINT", "RECORD", "WEIGHTS", "EngineOptions", "evaluate", "load_checkpoint", "load_model",
           "lr_factor", "make_optimizer", "run", "train_epoch", "validate"]


@dataclass(frozen=True)
class EngineOptions:
    """How a run executes, as opposed to what it computes (not part of the run's identity).

    ``precision``: ``auto`` (the policy of :func:`kdlib.precision.resolve_precision`), ``fp32``,
    ``bf16`` or ``fp16``; it changes the arithmetic, so the record states it. ``channels_last``
    (None: the precision's choice) changes the memory layout only. ``progress``: ``True`` shows a
    tqdm bar in an interactive session and prints one line per run otherwise (``KDLIB_PROGRESS``
    = ``bar`` | ``line`` | ``none`` overrides); ``False`` prints nothing.
    """

    device: str | None = None  # None: cuda when available, else cpu
    precision: str | None = None  # None: $KDLIB_PRECISION, else auto
    channels_last: bool | None = None
    compile: bool = False
    progress: bool = True
    on_end: Callable[[nn.Module], None] | None = None  # called with the trained distiller of the run asked for

    def resolve_device(self) -> torch.device:
        """The device to train on; an unavailable one is refused before anything trains."""
        if not self.device:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise KDLibError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise KDLibError(f"device {self.device!r} asked for, but no CUDA GPU is available here")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise KDLibError(f"device {self.device!r}: only {torch.cuda.device_count()} GPU(s) here")
        elif device.type != "cpu":
            raise KDLibError(f"device type {device.type!r} is not supported; use cpu or cuda")
        return device

    def progress_mode(self) -> str:
        """``bar``, ``line`` or ``none``: a bar only where a person watches it refresh."""
        if not self.progress:
            return "none"
        mode = os.environ.get("KDLIB_PROGRESS", "auto")
        if mode not in ("auto", "bar", "line", "none"):
            raise KDLibError(f"KDLIB_PROGRESS={mode!r}; choose auto, bar, line or none")
        if mode != "auto":
            return mode
        return "bar" if sys.stdout.isatty() else "line"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- the run ----------------------------------------------------------------------------------
def run(cfg: RunConfig, *, options: EngineOptions | None = None, root: Path | None = None) -> dict:
    """Return the record of ``cfg``: cached if complete, else resumed or trained now.

    Everything checkable is checked first (options, epochs, device, pairing), so bad input fails
    in a second, not after the teacher has trained. A second process asking for a run that one
    is training waits for it, then reuses its record (:func:`kdlib.run_store.run_lock`); under
    torchrun the ranks train the run together and take no lock.
    """
    options = options or EngineOptions()
    validate(cfg)
    device = options.resolve_device()
    resolve_precision(device, options.precision)  # an impossible precision fails here too
    lock = run_lock(cfg, root) if distributed.world()[1] == 1 else nullcontext()
    with lock:
        record = _cached(cfg, root)
        if record is not None:
            return record
        teacher = None
        if cfg.teacher is not None:
            # The teacher's run is not the one asked for: it gets no on_end.
            run(cfg.teacher, options=dataclasses.replace(options, on_end=None), root=root)
            teacher = load_model(cfg.teacher, root=root)
        return _fit(cfg, teacher, options, root)


def _cached(cfg: RunConfig, root: Path | None) -> dict | None:
    """The complete record of ``cfg``; a diverged one is raised (it would diverge again)."""
    record = find_record(cfg, root)
    if record is not None:
        return record
    diverged = find_record(cfg, root, status="diverged")
    if diverged is not None:  # the same config, seed and arithmetic would diverge again
        raise NonFiniteLossError(
            f"run {diverged['name']} diverged before ({diverged.get('device')}, {diverged.get('precision')}): "
            f"{diverged['error']} (record in {run_dir(cfg, root)}; delete that folder to train it again, "
            "e.g. on other hardware or at another precision)",
            record=diverged,
        )
    return None


def diverged_record(error: NonFiniteLossError, cfg: RunConfig) -> dict | None:
    """The ``diverged`` record of ``cfg`` that ``error`` carries; None if it carries none, or that of
    another run (the teacher, trained first): a teacher's divergence is not the student's result."""
    record = error.record
    return record if record is not None and record.get("hash") == config_hash(cfg) else None


def validate(cfg: RunConfig) -> None:
    """Check dataset, schedule, names, options and the teacher/student pairing, building nothing big."""
    if cfg.data.name not in DATASETS:
        raise KDLibError(f"unknown dataset {cfg.data.name!r}; choose one of {', '.join(DATASETS)}")
    for run_cfg in (cfg, cfg.teacher) if cfg.teacher is not None else (cfg,):
        optim = run_cfg.optim
        if isinstance(optim.epochs, bool) or not isinstance(optim.epochs, int) or optim.epochs < 1:
            raise KDLibError(f"epochs must be a whole number >= 1, got {optim.epochs!r}")
        if not optim.lr > 0:
            raise KDLibError(f"the learning rate must be > 0, got {optim.lr!r}")
        if cfg.data.batch_size < 2:
            raise KDLibError(f"batch_size must be >= 2 (BatchNorm needs two samples), got {cfg.data.batch_size}")
    k = num_classes(cfg)
    student = create_model(cfg.student, num_classes=k)
    teacher = create_model(cfg.teacher.student, num_classes=k) if cfg.teacher is not None else None
    create_distiller(cfg.method, student, teacher, **dict(cfg.method_options))


def load_model(cfg: RunConfig, root: Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The trained student of a finished run (in eval mode)."""
    model = create_model(cfg.student, num_classes=num_classes(cfg))
    load_weights(model, run_dir(cfg, root) / WEIGHTS, what=f"{cfg.student} ({run_name(cfg)})")
    return model.to(device).eval()


def num_classes(cfg: RunConfig) -> int:
    """Classes of the run's dataset, without loading it."""
    return {"cifar10": 10, "cifar100": 100}.get(cfg.data.name, cfg.data.num_classes)


# --- one fit, in four readable steps: set up, restore, train epochs (checkpointing), finish --------
@dataclass
class _Session:
    """Everything one fit holds: what the four steps below share."""

    cfg: RunConfig
    key: str
    folder: Path
    device: torch.device
    precision: Precision
    main_process: bool
    bundle: object
    distiller: nn.Module
    forward: Callable | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    ema: torch.optim.swa_utils.AveragedModel | None  # the scored weights when cfg.optim.ema_decay > 0
    steps_per_epoch: int
    start_epoch: int = 0
    elapsed: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)


def _fit(cfg: RunConfig, teacher: nn.Module | None, options: EngineOptions, root: Path | None) -> dict:
    s = _setup(cfg, teacher, options, root)
    _restore(s)
    mode = options.progress_mode() if s.main_process else "none"
    bar = tqdm(range(s.start_epoch, cfg.optim.epochs), total=cfg.optim.epochs, initial=s.start_epoch,
               desc=f"{cfg.method} {cfg.student}", disable=mode != "bar", file=sys.stdout, ncols=100,
               mininterval=2.0)
    for epoch in bar:
        t0 = time.perf_counter()
        try:
            row = train_epoch(s.distiller, s.bundle.train, s.optimizer, s.scheduler, epoch, s.steps_per_epoch,
                              s.precision, forward=s.forward, scaler=s.scaler, ema=s.ema)
            distributed.sync_buffers(s.distiller)  # every rank ends the epoch with rank 0's BN statistics
            s.distiller.on_epoch_end(epoch, row["losses"])
        except NonFiniteLossError as e:
            bar.close()
            raise _diverged(s, epoch, e) from None
        if (epoch + 1) % cfg.optim.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
            row.update(_score(s))
        row["time_s"] = time.perf_counter() - t0
        s.elapsed += row["time_s"]
        s.history.append(row)
        bar.set_postfix(loss=f"{sum(row['losses'].values()):.3f}", test=f"{row.get('test_acc', math.nan):.1f}")
        _save_checkpoint(s, epoch)
    bar.close()
    record = _finish(s, options)
    if mode == "line":
        print(f"trained {record['name']}: top-1 {record['top1_last']:.2f} % (last epoch) in {s.elapsed:.0f} s, "
              f"{record['precision']}")
    return record


def _score(s: _Session) -> dict:
    """Accuracy on the evaluated split: of the weight average when there is one (and of the raw weights)."""
    if s.ema is None:
        return {"test_acc": evaluate(s.distiller.student, s.bundle.test, s.device, s.precision)}
    return {"test_acc": evaluate(s.ema.module, s.bundle.test, s.device, s.precision),
            "test_acc_raw": evaluate(s.distiller.student, s.bundle.test, s.device, s.precision)}


def _weight_average(cfg: RunConfig, student: nn.Module, channels_last: bool):
    """The EMA of the student's weights and BN buffers, or None (``ema_decay`` 0).

    Built from a fresh copy of the architecture, so the distiller's feature hooks are not copied with it.
    """
    if not cfg.optim.ema_decay > 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    copy = create_model(cfg.student, num_classes=num_classes(cfg)).to(next(student.parameters()).device)
    copy.load_state_dict(student.state_dict())
    if channels_last:
        copy = copy.to(memory_format=torch.channels_last)
    return AveragedModel(copy, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True)


def _setup(cfg: RunConfig, teacher: nn.Module | None, options: EngineOptions, root: Path | None) -> _Session:
    """Device and process group, data, distiller, optimiser and schedule of a fresh fit."""
    device = distributed.device_for_rank(options.resolve_device())
    is_distributed = distributed.setup(device)
    rank, world_size = distributed.world()
    precision = resolve_precision(device, options.precision)
    channels_last = precision.channels_last if options.channels_last is None else options.channels_last
    precision = dataclasses.replace(precision, channels_last=channels_last)
    folder = run_dir(cfg, root)
    folder.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    bundle = get_loaders(cfg.data, device=device, seed=cfg.seed)
    if is_distributed:
        bundle.train.shard(rank, world_size)
    student = create_model(cfg.student, num_classes=bundle.num_classes)
    if teacher is not None:
        teacher = teacher.to(device)
    distiller = create_distiller(cfg.method, student, teacher, **dict(cfg.method_options)).to(device)
    if channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
    if options.compile:  # in place (nn.Module.compile): parameter names and forward hooks stay as they are
        distiller.student.compile()
        if teacher is not None:
            teacher.compile()
    forward = None  # the distiller's own forward_train, unless DDP must see the forward
    if is_distributed:
        if distiller.custom_backward:
            raise KDLibError(f"method {cfg.method!r} runs its own backward (memory_saving): not under torchrun")
        # DDP hooks average the gradients of student and extras across ranks during backward;
        # find_unused_parameters: LAKD's curriculum leaves unreleased modules without gradients.
        forward = torch.nn.parallel.DistributedDataParallel(distiller, find_unused_parameters=True)
    scaler = precision.grad_scaler()
    if scaler is not None and distiller.custom_backward:
        raise KDLibError(f"method {cfg.method!r} runs its own backward (memory_saving): not with fp16 loss scaling")
    optimizer = make_optimizer(distiller.learnable_parameters(), cfg.optim)
    steps_per_epoch = len(bundle.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(cfg.optim, i, steps_per_epoch))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        torch.cuda.reset_peak_memory_stats(device)
    ema = _weight_average(cfg, distiller.student, channels_last)
    return _Session(cfg, config_hash(cfg), folder, device, precision, rank == 0, bundle, distiller, forward,
                    optimizer, scheduler, scaler, ema, steps_per_epoch)


def _restore(s: _Session) -> None:
    """Resume from the run's last checkpoint, if there is one: weights, optimiser, schedule, RNGs."""
    path = s.folder / CHECKPOINT
    if not path.exists():
        return
    ckpt = load_checkpoint(path, s.key)
    written = ckpt.get("precision", s.precision.name)
    if written != s.precision.name:  # half a run in one arithmetic and half in another is no run at all
        short = {"fp32": "fp32", "bf16-autocast": "bf16", "fp16-autocast": "fp16"}.get(written, written)
        raise KDLibError(f"checkpoint {path} was written at {written}, this run uses {s.precision.name}: resume "
                         f"with precision='{short}' (KDLIB_PRECISION={short}), or delete {s.folder} to start over")
    s.distiller.load_trainable_state_dict(ckpt["distiller"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    if s.scaler is not None and ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])
    if s.ema is not None:
        s.ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if s.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], s.device)
    random.setstate(_as_random_state(ckpt["rng"]["python"]))
    s.start_epoch, s.history, s.elapsed = ckpt["epoch"], ckpt["history"], ckpt["elapsed_s"]


def _save_checkpoint(s: _Session, epoch: int) -> None:
    """The state after ``epoch`` (rank 0 writes it): enough to resume bit for bit."""
    if not s.main_process:
        return
    save_atomic(
        {
            "config_hash": s.key,
            "precision": s.precision.name,
            "epoch": epoch + 1,
            "distiller": s.distiller.trainable_state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "ema": s.ema.state_dict() if s.ema is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None,
                "python": random.getstate(),
            },
            "history": s.history,
            "elapsed_s": s.elapsed,
        },
        s.folder / CHECKPOINT,
    )


def _finish(s: _Session, options: EngineOptions) -> dict:
    """Write the final weights and the record (rank 0), call ``on_end``, return the record."""
    scored = [h for h in s.history if "test_acc" in h]  # every eval_every-th epoch and the last
    best = max(scored, key=lambda h: h["test_acc"])
    record = _record(s, "complete")
    record.update(top1_last=scored[-1]["test_acc"], top1_best=best["test_acc"], best_epoch=best["epoch"])
    if s.ema is not None:
        record["top1_last_raw"] = scored[-1]["test_acc_raw"]
    if options.on_end is not None:
        options.on_end(s.distiller)
    if s.main_process:
        scored_model = s.ema.module if s.ema is not None else s.distiller.student  # the weights the record scores
        student_state = {k: v.contiguous() for k, v in scored_model.state_dict().items()}
        save_atomic(student_state, s.folder / WEIGHTS)
        # After the weights are saved: on a CPU the measurement runs extra training steps.
        record["peak_memory"] = _peak_memory(s.device, s.distiller, s.bundle.train)
        write_json_atomic(s.folder / RECORD, record)
    distributed.barrier()  # the other ranks may go on to load what rank 0 just wrote
    return record


def _record(s: _Session, status: str) -> dict:
    """What every record holds, whatever the run's outcome (the caller adds accuracy or the error)."""
    from kdlib.run_store import identity

    return {
        "name": run_name(s.cfg),
        "hash": s.key,
        "status": status,
        "config": s.cfg.to_dict(),
        "identity": identity(s.cfg),
        "seed": s.cfg.seed,
        "versions": versions(),
        "device": device_description(s.device),
        "precision": s.precision.name,
        "channels_last": s.precision.channels_last,
        "world_size": distributed.world()[1],
        "history": s.history,
        "wall_time_s": s.elapsed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _diverged(s: _Session, epoch: int, error: NonFiniteLossError) -> NonFiniteLossError:
    """Write the ``diverged`` record (the epochs completed and the error) and return the error to raise.

    The last checkpoint stays: it holds the state at the end of the last finite epoch.
    """
    record = _record(s, "diverged")
    record.update(top1_last=None, top1_best=None, error=str(error), diverged_epoch=epoch + 1)
    if s.main_process:
        write_json_atomic(s.folder / RECORD, record)
    distributed.barrier()  # every process stopped at the same step (check_finite agrees across ranks)
    return NonFiniteLossError(f"{error} (epoch {epoch + 1} of run {record['name']})", record=record)


def _as_random_state(state):
    # JSON-like containers come back as lists; random.setstate wants tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _peak_memory(device: torch.device, distiller, loader) -> dict:
    """Peak training memory: CUDA's allocator peak over the run; on a CPU, one measured step.

    On a CPU there is no allocator peak to read (process RSS only grows, across runs too), so one
    training step on the first batch is measured with the torch profiler's memory accounting
    (kdlib.memory). It runs on the trained distiller after its weights are saved.
    """
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "method": "torch.cuda.max_memory_allocated"}
    from kdlib.memory import train_step_peak_memory

    loader.set_epoch(0)
    x, y = next(iter(loader))
    result = train_step_peak_memory(distiller, x, y)
    return {"bytes": int(result["bytes"]), "method": f"one training step, batch {len(y)}: {result['method']}"}
