"""The Distiller base class (mdistiller style).

``forward_train(x, y)`` returns the student's logits and a dict of named, already-weighted loss
terms; the engine sums them. The teacher is frozen, never leaves ``eval()`` and runs under
``no_grad``. Extra trainable modules (regressors, attention heads) live in ``self.extras`` so the
optimiser sees them and checkpoints hold them; the teacher's weights are not checkpointed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdlib import KDLibError, distributed
from kdlib.distill.options import MethodOptions, NoOptions
from kdlib.features import FeatureTap


class NonFiniteLossError(KDLibError):
    """A loss term became NaN or infinite; the message names the term and the step.

    When the engine raises it, ``record`` is the run's ``diverged`` record (config, the epochs
    completed, the error), which the engine also wrote to the cache: a divergence is a result.
    """

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record


class IncompatibleModelsError(KDLibError):
    """The teacher and student cannot be paired by this method (e.g. unmatched stage counts)."""


@torch.no_grad()
def feature_shapes(
    model: nn.Module, names: list[str], image_size: int = 32
) -> dict[str, tuple[int, ...]]:
    """Shapes (C, H, W) of the named features for one input, without touching BN statistics."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with FeatureTap(model, names) as tap:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
            return {n: tuple(tap[n].shape[1:]) for n in names}
    finally:
        model.train(was_training)


class Distiller(nn.Module):
    """Base class: student + frozen teacher + extra trainable modules.

    A subclass declares its options once, as a nested frozen dataclass ``Options``
    (:mod:`kdlib.distill.options`); ``self.options`` holds the complete, validated set. ``version``
    is part of every run's identity: bump it when the method's computation changes, so that runs
    cached with the old computation are not returned for the new one.
    """

    method_name = "base"
    needs_teacher = True
    #: Distillers that run their own backward (LAKD's memory-saving mode) set this to True.
    custom_backward = False
    Options: type[MethodOptions] = NoOptions
    version = 1

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, **options):
        super().__init__()
        self.options = self.Options.resolve(self.method_name, options)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        self.extras = nn.ModuleDict()

    # --- modes -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics and dropout of the teacher never change
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Inference (``y`` None): the student's logits. Training: ``forward_train(x, y)``.

        The training form exists so that DistributedDataParallel, which must see the forward that
        produces the loss, can wrap the whole distiller.
        """
        if y is None:
            return self.student(x)
        return self.forward_train(x, y)

    # --- what the optimiser and the checkpoints see -------------------------------------------
    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.extras.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict without the teacher (its weights come from the teacher's own run)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # tensors of another shape: another architecture or width
            first = str(e).strip().splitlines()[-1].strip()
            raise KDLibError(f"checkpoint does not match method {self.method_name!r}: {first}") from None
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise KDLibError(
                f"checkpoint does not match method {self.method_name!r}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    # --- training ------------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, y: torch.Tensor):
        raise NotImplementedError

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int = 0, forward=None, scaler=None):
        """Forward, check every term is finite, backward. The engine steps the optimiser.

        ``forward(x, y)`` defaults to :meth:`forward_train` (the engine passes a DDP wrapper);
        ``scaler`` is fp16's ``torch.amp.GradScaler`` (the loss is scaled before backward).
        Returns the logits and the detached loss terms.
        """
        logits, losses = (forward or self.forward_train)(x, y)
        # The engine passes a forward only under torchrun (the DDP wrapper): then every process must
        # agree before DDP's gradient all-reduce in backward. A lone step (memory measurement) must not.
        check_finite(losses, step, across_ranks=forward is not None)
        total = sum(losses.values())
        (scaler.scale(total) if scaler is not None else total).backward()
        return logits.detach(), {k: v.detach() for k, v in losses.items()}

    def on_epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        """Called by the engine after each training epoch (AFT-KD adapts its weights here)."""


def check_finite(losses: dict[str, torch.Tensor], step: int, across_ranks: bool = False) -> None:
    """Raise :class:`NonFiniteLossError` naming the first NaN/inf term.

    One device sync per step: the check is the point (a NaN must stop the run, not poison it).
    """
    values = torch.stack([v.detach().float() for v in losses.values()])
    # across_ranks (torchrun): every process must stop at the same step; one that went on would wait
    # forever in DDP's gradient all-reduce for the one that stopped.
    bad = (~torch.isfinite(values)).any().float().reshape(1)
    if across_ranks:
        bad = distributed.sum_across_ranks(bad)
    if bool(bad.item()):
        for name, v in zip(losses, values.tolist(), strict=True):
            if not math.isfinite(v):
                raise NonFiniteLossError(f"loss term {name!r} is {v} at step {step}")
        raise NonFiniteLossError(f"a loss term is not finite on another process at step {step}")
