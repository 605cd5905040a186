"""The training engine: fit, evaluate, checkpoint, resume, cache.

``run(cfg)`` is the entry point every notebook and the CLI use: it returns the cached record of a
finished run with the same config, resumes an interrupted one from its last checkpoint, or trains
it from scratch. Teachers are trained by the same engine (a teacher is a ``vanilla`` run), so a
student run first asks for its teacher's run.

Determinism: the data order and augmentation of epoch ``e`` are a pure function of (seed, e)
(``set_epoch``), and the checkpoint holds the torch RNG state for everything else (dropout in
SAKD), so a run killed at any point and resumed ends with the same weights as one that was not.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kdlib import KDLibError, distributed
from kdlib.config import OptimConfig, RunConfig
from kdlib.data import get_loaders
from kdlib.distill import create_distiller
from kdlib.distill.base import NonFiniteLossError
from kdlib.models import create_model
from kdlib.results import (
    config_hash,
    device_description,
    find_record,
    run_dir,
    run_name,
    versions,
    write_json_atomic,
)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "student.pt"
RECORD = "record.json"


@dataclass(frozen=True)
class EngineOptions:
    """How a run executes, as opposed to what it computes (not part of the config hash).

    ``channels_last`` changes the memory layout only. ``amp`` (bf16 autocast) is used on CUDA
    only and is written into the record, since it changes the arithmetic.
    """

    device: str | None = None  # None: cuda when available, else cpu
    channels_last: bool = True
    amp: bool | None = None  # None: on for cuda, off for cpu
    compile: bool = False
    progress: bool = True
    on_end: Callable[[nn.Module], None] | None = None  # called with the trained distiller, on every rank

    def resolve_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- optimisation ---------------------------------------------------------------------------
def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig):
    """SGD; with ``no_decay_bn_bias`` the 1-D parameters (BN, biases) get no weight decay."""
    if cfg.no_decay_bn_bias:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": params}]
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at iteration ``step`` (schedules are per iteration)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "multistep":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        warm = int(round(cfg.warmup_frac * total))
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise KDLibError(f"unknown schedule {cfg.schedule!r}; choose 'multistep' or 'cosine'")


# --- evaluation -----------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader``; the model's train/eval state is restored."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    try:
        for x, y in loader:
            logits = model(x)
            correct += (logits.argmax(1) == y).sum()
            total += y.numel()
    finally:
        model.train(was_training)
    return 100.0 * correct.item() / max(1, total)


# --- checkpoints ----------------------------------------------------------------------------
def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, expected_hash: str) -> dict:
    """Load with ``weights_only=True``; a corrupt or foreign file is a clear error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KDLibError(f"no checkpoint at {path} (the run has not finished an epoch in this cache)") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise KDLibError(f"checkpoint {path} is corrupt or not a kdlib checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config_hash" not in ckpt:
        raise KDLibError(f"checkpoint {path} is not a kdlib checkpoint")
    if ckpt["config_hash"] != expected_hash:
        raise KDLibError(
            f"checkpoint {path} belongs to another config (hash {ckpt['config_hash']}, expected {expected_hash})"
        )
    return ckpt


def load_weights(model: nn.Module, path: Path, what: str = "model") -> nn.Module:
    """Load a state dict saved by the engine into ``model``, with a clear error on mismatch."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KDLibError(f"{what} weights not found at {path}") from None
    except Exception as e:
        raise KDLibError(f"{what} weights at {path} are corrupt ({type(e).__name__})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise KDLibError(f"{what} weights at {path} do not match {type(model).__name__}: {first}") from None
    return model


# --- the run ----------------------------------------------------------------------------------
def run(cfg: RunConfig, *, options: EngineOptions | None = None, root: Path | None = None) -> dict:
    """Return the record of ``cfg``: cached if complete, else resumed or trained now."""
    options = options or EngineOptions()
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
    validate(cfg)  # fail in a second, not after the teacher has trained
    teacher = None
    if cfg.teacher is not None:
        run(cfg.teacher, options=options, root=root)  # cached after the first student asks
        teacher = load_model(cfg.teacher, root=root)
    return _fit(cfg, teacher, options, root)


def diverged_record(error: NonFiniteLossError, cfg: RunConfig) -> dict | None:
    """The ``diverged`` record of ``cfg`` that ``error`` carries; None if it carries none, or that of
    another run (the teacher, trained first): a teacher's divergence is not the student's result."""
    record = error.record
    return record if record is not None and record.get("hash") == config_hash(cfg) else None


def validate(cfg: RunConfig) -> None:
    """Check names, options and the teacher/student pairing by building the distiller once."""
    if cfg.data.name not in ("shapes", "cifar10", "cifar100"):
        raise KDLibError(f"unknown dataset {cfg.data.name!r}; choose shapes, cifar10 or cifar100")
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


def _fit(cfg: RunConfig, teacher: nn.Module | None, options: EngineOptions, root: Path | None) -> dict:
    device = distributed.device_for_rank(options.resolve_device())
    is_distributed = distributed.setup(device)
    rank, world_size = distributed.world()
    main_process = rank == 0
    folder = run_dir(cfg, root)
    folder.mkdir(parents=True, exist_ok=True)
    key = config_hash(cfg)
    seed_everything(cfg.seed)

    bundle = get_loaders(cfg.data, device=device, seed=cfg.seed)
    if is_distributed:
        bundle.train.shard(rank, world_size)
    student = create_model(cfg.student, num_classes=bundle.num_classes)
    if teacher is not None:
        teacher = teacher.to(device)
    distiller = create_distiller(cfg.method, student, teacher, **dict(cfg.method_options)).to(device)
    if options.channels_last:
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
    use_amp = (device.type == "cuda") if options.amp is None else (options.amp and device.type == "cuda")
    params = distiller.learnable_parameters()
    optimizer = make_optimizer(params, cfg.optim)
    steps_per_epoch = len(bundle.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.optim, s, steps_per_epoch)
    )

    history: list[dict] = []
    start_epoch, elapsed = 0, 0.0
    ckpt_path = folder / CHECKPOINT
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, key)
        distiller.load_trainable_state_dict(ckpt["distiller"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        random.setstate(_as_random_state(ckpt["rng"]["python"]))
        start_epoch, history, elapsed = ckpt["epoch"], ckpt["history"], ckpt["elapsed_s"]

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(
        range(start_epoch, cfg.optim.epochs),
        total=cfg.optim.epochs,
        initial=start_epoch,
        desc=f"{cfg.method} {cfg.student}",
        disable=not (options.progress and main_process),
        file=sys.stdout,
        dynamic_ncols=False,
        ncols=100,
        mininterval=2.0,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        try:
            row = train_epoch(distiller, bundle.train, optimizer, scheduler, epoch, steps_per_epoch, use_amp,
                              options, forward=forward)
            distributed.sync_buffers(distiller)  # every rank ends the epoch with rank 0's BN statistics
            distiller.on_epoch_end(epoch, row["losses"])
        except NonFiniteLossError as e:
            bar.close()
            raise _diverged(cfg, key, folder, epoch, history, elapsed, device, use_amp, options, e,
                           main_process) from None
        row["test_acc"] = evaluate(distiller.student, bundle.test, device)
        row["time_s"] = time.perf_counter() - t0
        elapsed += row["time_s"]
        history.append(row)
        bar.set_postfix(loss=f"{sum(row['losses'].values()):.3f}", test=f"{row['test_acc']:.1f}")
        if main_process:
            save_atomic(
                {
                    "config_hash": key,
                    "epoch": epoch + 1,
                    "distiller": distiller.trainable_state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "python": random.getstate(),
                    },
                    "history": history,
                    "elapsed_s": elapsed,
                },
                ckpt_path,
            )
    bar.close()

    accs = [h["test_acc"] for h in history]
    best = max(range(len(accs)), key=accs.__getitem__)
    record = _record(cfg, key, "complete", device, use_amp, options, history, elapsed)
    record.update(top1_last=accs[-1], top1_best=accs[best], best_epoch=best + 1)
    if options.on_end is not None:
        options.on_end(distiller)
    if main_process:
        student_state = {k: v.contiguous() for k, v in distiller.student.state_dict().items()}
        save_atomic(student_state, folder / WEIGHTS)
        # After the weights are saved: on a CPU the measurement runs extra training steps.
        record["peak_memory"] = _peak_memory(device, distiller, bundle.train)
        write_json_atomic(folder / RECORD, record)
    distributed.barrier()  # the other ranks may go on to load what rank 0 just wrote
    return record


def _record(cfg: RunConfig, key: str, status: str, device: torch.device, use_amp: bool, options: EngineOptions,
            history: list[dict], elapsed: float) -> dict:
    """What every record holds, whatever the run's outcome (the caller adds accuracy or the error)."""
    return {
        "name": run_name(cfg),
        "hash": key,
        "status": status,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "device": device_description(device),
        "precision": "bf16-autocast" if use_amp else "fp32",
        "channels_last": options.channels_last,
        "world_size": distributed.world()[1],
        "history": history,
        "wall_time_s": elapsed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _diverged(cfg: RunConfig, key: str, folder: Path, epoch: int, history: list[dict], elapsed: float,
              device: torch.device, use_amp: bool, options: EngineOptions, error: NonFiniteLossError,
              main_process: bool) -> NonFiniteLossError:
    """Write the ``diverged`` record (the epochs completed and the error) and return the error to raise.

    The last checkpoint stays: it holds the state at the end of the last finite epoch.
    """
    record = _record(cfg, key, "diverged", device, use_amp, options, history, elapsed)
    record.update(top1_last=None, top1_best=None, error=str(error), diverged_epoch=epoch + 1)
    if main_process:
        write_json_atomic(folder / RECORD, record)
    distributed.barrier()  # every process stopped at the same step (check_finite agrees across ranks)
    return NonFiniteLossError(f"{error} (epoch {epoch + 1} of run {record['name']})", record=record)


def _as_random_state(state):
    # JSON-like containers come back as lists; random.setstate wants tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def train_epoch(distiller, loader, optimizer, scheduler, epoch, steps_per_epoch, use_amp, options,
                forward=None) -> dict:
    """One epoch of training; returns the epoch's mean loss terms, train accuracy and lr.

    ``forward``: what computes ``(logits, losses)`` from ``(x, y)`` — the DDP wrapper under
    torchrun, else the distiller's own ``forward_train``.
    """
    distiller.train()
    loader.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    correct, seen = None, 0
    lr = optimizer.param_groups[0]["lr"]
    for i, (x, y) in enumerate(loader):
        step = epoch * steps_per_epoch + i
        if options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits, losses = distiller.train_step(x, y, step=step, forward=forward)
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: no host sync per step beyond the finite check.
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.float() * y.numel()
        hit = (logits.argmax(1) == y).sum()
        correct = hit if correct is None else correct + hit
        seen += y.numel()
    if seen == 0:
        raise KDLibError("the training loader yielded no batches")
    # One sync per epoch: sum the loss totals, hits and sample counts of every rank.
    names = list(sums)
    totals = torch.stack([sums[k] for k in names] + [correct.float(), torch.tensor(float(seen), device=correct.device)])
    totals = distributed.sum_across_ranks(totals).tolist()
    seen_all = totals[-1]
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "losses": {k: v / seen_all for k, v in zip(names, totals[:-2], strict=True)},
        "train_acc": 100.0 * totals[-2] / seen_all,
    }


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
