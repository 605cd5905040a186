"""One training epoch and one evaluation pass, in a run's precision (what the engine repeats)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from kdlib import KDLibError, distributed
from kdlib.precision import Precision


def train_epoch(distiller, loader, optimizer, scheduler, epoch, steps_per_epoch, precision: Precision,
                forward=None, scaler=None, ema=None) -> dict:
    """One epoch of training; returns the epoch's mean loss terms, train accuracy and lr.

    ``precision`` gives the autocast and the memory layout; ``scaler`` is fp16's GradScaler (else
    None); ``ema`` a ``torch.optim.swa_utils.AveragedModel`` of the student, updated after every step.
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
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits, losses = distiller.train_step(x, y, step=step, forward=forward, scaler=scaler)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(distiller.student)
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


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device | None = None, precision: Precision | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on ``loader`` (in the run's precision); train/eval state restored."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    try:
        for x, y in loader:
            if precision is not None and precision.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast() if precision is not None else nullcontext():
                logits = model(x)
            correct += (logits.argmax(1) == y).sum()
            total += y.numel()
    finally:
        model.train(was_training)
    return 100.0 * correct.item() / max(1, total)
