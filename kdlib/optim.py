"""The optimiser and the learning-rate schedules of every run (CRD's multistep, warm-up + cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdlib import KDLibError
from kdlib.config import OptimConfig


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
