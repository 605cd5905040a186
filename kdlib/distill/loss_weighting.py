"""Adaptive weights for several distillation losses, by how fast each loss is falling.

Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019), as used by AFT-KD: a loss whose mean
barely moved since the previous period gets more weight than one that is already dropping fast,

    r_k = L̄_k(now) / L̄_k(one period back),     w_k = K · exp(r_k / T) / Σ_j exp(r_j / T),

so the weights always sum to the number of losses ``K`` and are all 1 while there is not yet a
full period of history. The weights multiply *raw* losses; the caller applies its own base scales.

Three schedules share one interface (:class:`LossWeighting`):

- :class:`EpochDWA` (``"adaptive"``): the period is one epoch; ``L̄_k(e)`` is the mean raw loss
  of epoch ``e``; weights change only at epoch ends and are 1 during epochs 0 and 1.
- :class:`IterationDWA` (``"iteration"``): the period is a window of ``W`` steps over an
  exponential moving average of the raw losses (see the class for the exact recurrence);
  weights change every step once ``W + 1`` steps have been seen.
- :class:`FixedWeighting` (``"fixed"``): ``w_k = 1`` always (the ablation); it still records the
  loss history, so the figures can compare the decays with and without adaptation.

Per step the caller hands the raw losses to :meth:`LossWeighting.observe`; everything per step
stays on the device (no host synchronisation). :meth:`LossWeighting.epoch_end` reads the epoch
means back once per epoch. The whole state (histories, current weights, EMA) travels in the
module's ``state_dict`` through ``get_extra_state``/``set_extra_state``, so a resumed run weights
its losses exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kdlib import KDLibError
from kdlib.distill.base import NonFiniteLossError

WEIGHTINGS = ("adaptive", "iteration", "fixed")

#: Denominator floor of the descent ratio: a loss that was exactly 0 must not divide by zero.
_EPS = 1e-12


def dwa_weights(ratios: torch.Tensor, temperature: float) -> torch.Tensor:
    """``K · softmax(r / T)``: the DWA weights for descent ratios ``r`` (a 1-D tensor of K values)."""
    return ratios.numel() * torch.softmax(ratios / temperature, dim=0)


def descent_ratios(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``L(now) / L(before)`` per loss, with the denominator floored at a tiny positive value."""
    return now / before.clamp_min(_EPS)


class LossWeighting(nn.Module):
    """Common state and bookkeeping; subclasses decide when and how the weights change.

    The per-epoch records are :attr:`raw_loss_history` (mean raw loss of each epoch) and
    :attr:`weight_history` (mean weight used during each epoch: the epoch's constant weight for
    the epoch-level schedule), one ``{name: value}`` dict per epoch, index ``e`` = epoch ``e``.
    """

    kind = "base"

    def __init__(self, names: Sequence[str], temperature: float = 2.0):
        super().__init__()
        if not names or len(set(names)) != len(names):
            raise KDLibError(f"loss weighting needs distinct loss names, got {list(names)}")
        if not temperature > 0:
            raise KDLibError(f"weighting temperature must be > 0, got {temperature}")
        self.names = tuple(names)
        self.temperature = float(temperature)
        k = len(self.names)
        # Non-persistent buffers: they follow .to(device); their values travel in the extra state.
        self.register_buffer("_weights", torch.ones(k), persistent=False)
        self.register_buffer("_raw_sum", torch.zeros(k), persistent=False)
        self.register_buffer("_weight_sum", torch.zeros(k), persistent=False)
        self._steps_in_epoch = 0
        self._raw_history: list[dict[str, float]] = []
        self._weight_history: list[dict[str, float]] = []
        self._epochs: list[int] = []

    # --- reading the weights ---------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        """The weights to use for the next step, in the order of :attr:`names` (on the device)."""
        return self._weights

    def weights_dict(self) -> dict[str, torch.Tensor]:
        """``{name: 0-d weight tensor}`` for the next step (on the device, no host sync).

        A snapshot (clone), not views of the buffer: :meth:`observe` may update the buffer in
        place before the caller multiplies, and autograd must keep the value that was used.
        """
        w = self._weights.detach().clone()
        return {n: w[i] for i, n in enumerate(self.names)}

    @property
    def raw_loss_history(self) -> list[dict[str, float]]:
        return [dict(h) for h in self._raw_history]

    @property
    def weight_history(self) -> list[dict[str, float]]:
        return [dict(h) for h in self._weight_history]

    @property
    def epochs(self) -> list[int]:
        """The epoch numbers the engine passed to :meth:`epoch_end`, one per history entry."""
        return list(self._epochs)

    # --- feeding it ------------------------------------------------------------------------------
    def _stack(self, raw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in raw]
        if missing:
            raise KDLibError(f"loss weighting got no value for {missing}; expects {list(self.names)}")
        return torch.stack([raw[n].detach().float().reshape(()) for n in self.names])

    @torch.no_grad()
    def observe(self, raw: Mapping[str, torch.Tensor]) -> None:
        """Record one step's raw (unweighted) losses; call after reading :attr:`weights`."""
        values = self._stack(raw).to(self._raw_sum.device)
        self._raw_sum += values
        self._weight_sum += self._weights
        self._steps_in_epoch += 1
        self._after_step(values)

    @torch.no_grad()
    def epoch_end(self, epoch: int) -> dict[str, float]:
        """Close epoch ``epoch``: store its mean raw losses and weights, update; return next weights."""
        if self._steps_in_epoch == 0:
            raise KDLibError(
                f"epoch {epoch} ended with no training step observed by the loss weighting "
                "(was forward_train called with the distiller in train mode?)"
            )
        means = (torch.stack([self._raw_sum, self._weight_sum]) / self._steps_in_epoch).tolist()
        raw_means = dict(zip(self.names, means[0]))
        bad = [n for n, v in raw_means.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"mean raw loss of {bad} is not finite in epoch {epoch}")
        self._raw_history.append(raw_means)
        self._weight_history.append(dict(zip(self.names, means[1])))
        self._epochs.append(int(epoch))
        self._raw_sum.zero_()
        self._weight_sum.zero_()
        self._steps_in_epoch = 0
        self._after_epoch()
        return dict(zip(self.names, self._weights.tolist()))

    def _after_step(self, raw: torch.Tensor) -> None:
        """Hook for schedules that adapt per step (raw: the K detached losses of this step)."""

    def _after_epoch(self) -> None:
        """Hook for schedules that adapt per epoch (the history already holds the closed epoch)."""

    # --- checkpoints -----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """Everything that decides future weights, as CPU tensors and plain Python values.

        Only dicts, lists, strings, numbers and tensors, so ``torch.load(weights_only=True)`` can
        read the checkpoint.
        """
        state = {
            "kind": self.kind,
            "names": list(self.names),
            "temperature": self.temperature,
            "weights": self._weights.detach().cpu().clone(),
            "raw_sum": self._raw_sum.detach().cpu().clone(),
            "weight_sum": self._weight_sum.detach().cpu().clone(),
            "steps_in_epoch": self._steps_in_epoch,
            "raw_history": self.raw_loss_history,
            "weight_history": self.weight_history,
            "epochs": self.epochs,
        }
        state.update(self._schedule_state())
        return state

    def set_extra_state(self, state: dict) -> None:
        if state.get("kind") != self.kind or list(state.get("names", ())) != list(self.names):
            raise KDLibError(
                f"checkpoint holds loss weighting {state.get('kind')!r} over {state.get('names')}, "
                f"this run uses {self.kind!r} over {list(self.names)}"
            )
        self._weights.copy_(state["weights"])
        self._raw_sum.copy_(state["raw_sum"])
        self._weight_sum.copy_(state["weight_sum"])
        self._steps_in_epoch = int(state["steps_in_epoch"])
        self._raw_history = [dict(h) for h in state["raw_history"]]
        self._weight_history = [dict(h) for h in state["weight_history"]]
        self._epochs = [int(e) for e in state["epochs"]]
        self._load_schedule_state(state)

    def _schedule_state(self) -> dict:
        return {}

    def _load_schedule_state(self, state: dict) -> None:
        pass

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, temperature={self.temperature}"


class FixedWeighting(LossWeighting):
    """``w_k = 1`` always; records the same histories as the adaptive schedules."""

    kind = "fixed"


class EpochDWA(LossWeighting):
    """DWA at epoch level: ``r_k(e) = L̄_k(e−1) / L̄_k(e−2)``; weights 1 for epochs 0 and 1.

    After epoch ``e−1`` closes, the weights for epoch ``e`` come from the last two epoch means of
    the raw losses (:attr:`raw_loss_history`), so they stay constant within an epoch.
    """

    kind = "adaptive"

    def _after_epoch(self) -> None:
        if len(self._raw_history) < 2:
            return
        last, before = self._raw_history[-1], self._raw_history[-2]
        now = torch.tensor([last[n] for n in self.names], dtype=torch.float64)
        prev = torch.tensor([before[n] for n in self.names], dtype=torch.float64)
        w = dwa_weights(descent_ratios(now, prev), self.temperature)
        self._weights.copy_(w.to(self._weights.dtype))


class IterationDWA(LossWeighting):
    """DWA at iteration level over an exponential moving average of the raw losses.

    With decay ``β`` and window ``W`` (in steps), after step ``t`` (1-based):

        m_t = β·m_{t−1} + (1−β)·L_t,   m_0 = 0;     m̂_t = m_t / (1 − β^t)   (bias-corrected, as Adam)
        r_k = m̂_t / m̂_{t−W}                                                 (once t > W)
        w(t+1) = K · softmax(r / T)

    so the weights for a step never depend on that step's own loss (as in the epoch version),
    a ratio compares "now" with "one window back" on a smoothed curve instead of two noisy
    single batches, and the weights are 1 for the first ``W + 1`` steps. The last ``W`` values of
    ``m̂`` are kept in a ring buffer on the device: no host synchronisation per step. The step
    counter does not reset at epoch ends (the EMA is a property of the run, not of an epoch).
    """

    kind = "iteration"

    def __init__(self, names: Sequence[str], temperature: float = 2.0, *, decay: float = 0.9,
                 window: int = 50):
        super().__init__(names, temperature)
        if not 0.0 <= decay < 1.0:
            raise KDLibError(f"EMA decay must be in [0, 1), got {decay}")
        if int(window) != window or window < 1:
            raise KDLibError(f"EMA window must be a positive number of steps, got {window}")
        self.decay, self.window = float(decay), int(window)
        k = len(self.names)
        self.register_buffer("_ema", torch.zeros(k), persistent=False)
        self.register_buffer("_ring", torch.zeros(self.window, k), persistent=False)
        self._step = 0

    def _after_step(self, raw: torch.Tensor) -> None:
        self._step += 1
        t, beta = self._step, self.decay
        self._ema.mul_(beta).add_(raw, alpha=1.0 - beta)
        smoothed = self._ema / (1.0 - beta**t)
        slot = t % self.window
        if t > self.window:  # the slot still holds m̂_{t−W}
            self._weights.copy_(dwa_weights(descent_ratios(smoothed, self._ring[slot]), self.temperature))
        self._ring[slot] = smoothed

    def _schedule_state(self) -> dict:
        return {
            "decay": self.decay,
            "window": self.window,
            "step": self._step,
            "ema": self._ema.detach().cpu().clone(),
            "ring": self._ring.detach().cpu().clone(),
        }

    def _load_schedule_state(self, state: dict) -> None:
        if int(state["window"]) != self.window:
            raise KDLibError(f"checkpoint EMA window is {state['window']}, this run uses {self.window}")
        self._step = int(state["step"])
        self._ema.copy_(state["ema"])
        self._ring.copy_(state["ring"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, decay={self.decay}, window={self.window}"


def make_weighting(
    kind: str, names: Sequence[str], *, temperature: float = 2.0, decay: float = 0.9, window: int = 50
) -> LossWeighting:
    """The schedule named ``kind`` (one of :data:`WEIGHTINGS`) over the losses ``names``."""
    if kind == "adaptive":
        return EpochDWA(names, temperature)
    if kind == "iteration":
        return IterationDWA(names, temperature, decay=decay, window=window)
    if kind == "fixed":
        return FixedWeighting(names, temperature)
    raise KDLibError(f"unknown weighting {kind!r}; choose one of {WEIGHTINGS}")
