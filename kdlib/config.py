"""Run configurations and the three profiles (``smoke``, ``book``, ``paper``).

A :class:`RunConfig` fully determines a run; its hash keys the run cache (kdlib.results). The
profile is chosen by ``KDLIB_PROFILE`` or passed explicitly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from kdlib import KDLibError

PROFILES = ("smoke", "book", "paper")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and how it is loaded. ``shapes`` is the embedded synthetic dataset."""

    name: str = "shapes"  # "shapes" | "cifar10" | "cifar100"
    batch_size: int = 128
    root: str | None = None  # CIFAR folder; default $KDLIB_DATA or ~/.cache/kdlib/data
    download: bool = False
    num_workers: int = 0  # CIFAR DataLoader workers
    # shapes only:
    train_size: int = 2000
    test_size: int = 2000
    num_classes: int = 10
    data_seed: int = 0
    difficulty: float = 1.0  # scales nuisance (distractors, noise, contrast); see kdlib.data
    # Which split the run is scored on: "test" (what the book reports) or "val", a third stream of
    # shapes images that calibration chooses on, so that the reported test figures carry no luck of
    # that choice.
    eval_split: str = "test"


@dataclass(frozen=True)
class OptimConfig:
    """SGD with either the CRD multistep schedule or warm-up + cosine (per iteration)."""

    epochs: int = 240
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    schedule: str = "multistep"  # "multistep" | "cosine"
    milestones: tuple[int, ...] = (150, 180, 210)
    gamma: float = 0.1
    warmup_frac: float = 0.0  # cosine only: linear warm-up over this share of iterations
    # Scoring (part of what a run computes): with ema_decay > 0 the reported accuracy is that of an
    # exponential moving average of the student's weights and buffers (torch.optim.swa_utils),
    # updated every step; the split is evaluated every ``eval_every`` epochs and after the last.
    ema_decay: float = 0.0
    eval_every: int = 1


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run."""

    student: str
    method: str = "vanilla"
    # The teacher's own run (trained by the same engine and cached): a new teacher is a new run.
    teacher: RunConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method_options: tuple[tuple[str, object], ...] = ()  # sorted (key, value) pairs, hashable
    seed: int = 0
    profile: str = "custom"

    def with_options(self, **options) -> RunConfig:
        merged = dict(self.method_options) | options
        return dataclasses.replace(self, method_options=tuple(sorted(merged.items())))

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (the form stored in run records and hashed for the cache)."""
        return {
            "student": self.student,
            "method": self.method,
            "teacher": self.teacher.to_dict() if self.teacher is not None else None,
            "data": dataclasses.asdict(self.data),
            "optim": {**dataclasses.asdict(self.optim), "milestones": list(self.optim.milestones)},
            "method_options": dict(self.method_options),
            "seed": self.seed,
            "profile": self.profile,
        }

    @property
    def teacher_name(self) -> str | None:
        return self.teacher.student if self.teacher is not None else None

    @staticmethod
    def from_dict(d: dict) -> RunConfig:
        d = dict(d)
        if d.get("teacher") is not None:
            d["teacher"] = RunConfig.from_dict(d["teacher"])
        d["data"] = DataConfig(**d["data"])
        optim = dict(d["optim"])
        optim["milestones"] = tuple(optim["milestones"])
        d["optim"] = OptimConfig(**optim)
        d["method_options"] = tuple(sorted(dict(d.get("method_options") or {}).items()))
        return RunConfig(**d)


def active_profile(profile: str | None = None) -> str:
    """The profile passed in, else ``$KDLIB_PROFILE``, else ``book``.

    ``book`` by default: a reader who opens a chapter (on Colab, say) without setting anything gets the
    runs the prose is written for. The tests, ``make test`` and a ``pytest`` run from the repository
    root set ``KDLIB_PROFILE=smoke`` themselves (the two ``conftest.py`` files, the Makefile).
    """
    name = profile or os.environ.get("KDLIB_PROFILE", "book")
    if name not in PROFILES:
        raise KDLibError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return name
