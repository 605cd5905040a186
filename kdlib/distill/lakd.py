"""LAKD — local attention knowledge distillation (reconstruction, METHODS.md §5).

The student is cut into **local modules**, one per stage: module 0 is ``stem + stages[0]``,
module k is ``stages[k]``, and the last module also owns the classifier ``head``. With
``truncate=True`` (default) each module reads the previous module's output *detached*, so a module
is trained only by its own losses:

- ``L_lf^k = mean‖φ_k(F_S^k) − F_T^k‖²``: φ_k is a 1×1 conv + BN when the channel counts
  differ (identity otherwise), trained with module k; the larger map is average-pooled to the
  smaller one's spatial size;
- ``L_att^k = mean((m(F_S^k) − m(F_T^k))²)`` with the NDAM map ``m`` of
  :func:`kdlib.attention.ndam_map`, on the raw student feature (``m`` pools channels away);
- ``L_h = CE`` on the last module's logits.

``L = α·L_h + (1−α)·att_weight·Σ_k L_att^k + β·Σ_k L_lf^k`` (α = 0.5, β = 30, att_weight = 1000).
β started as FitNets' 100 (set at lr 0.1); 30 keeps β·lr of that setting at the book's student rate
of 0.3 (a development run at β = 100 and lr 0.3 collapsed; it is not a recorded result, and the
chapter states only what its own runs show).

Loss terms returned (each already weighted, so the engine's sum is ``L``):

==========  ==============================  ==================  ============================
name        value                           present when        trains
==========  ==============================  ==================  ============================
``ce``      ``α·L_h``                       always              the last module
``att/k``   ``(1−α)·att_weight·L_att^k``    ndam "loss"/"both"  module k
``lf/k``    ``β·L_lf^k``                    always              module k and φ_k
==========  ==============================  ==================  ============================

Keys come in the order ``ce, att/0.., lf/0..``; :meth:`LAKD.module_loss_names` lists module k's.

Options:

- ``ndam="loss"`` (default): NDAM is the attention loss above, ``L_lf`` unweighted.
  ``ndam="weights"``: no attention loss; ``L_lf^k`` is weighted per position by the teacher's NDAM
  map rescaled to mean 1 (:func:`ndam_weights`). ``ndam="both"``: attention loss and weighted
  ``L_lf``.
- ``curriculum=N``: module k is *released* (its losses count, its parameters get gradients) once
  ``N·k`` epochs are done, so module 0 trains alone for N epochs, then modules 0–1, and so on;
  ``0`` trains every module from the start. Before release a module still runs forward, under
  ``no_grad`` (the next module needs its output and the engine needs logits), and its terms are 0.
  The count of finished epochs is a buffer, ``epochs_done``, so it is checkpointed.
- ``memory_saving=True``: :meth:`LAKD.train_step` runs module k's forward, its losses and its
  backward, and frees its graph *before* module k+1 runs; only one module's activations are ever
  alive. The gradients are the same as with one backward over the summed loss (truncation makes
  the modules' graphs disjoint). Needs ``truncate=True``. The teacher still runs once up front,
  so its stage maps stay alive until their module's backward. What this saves depends on how the
  activations are spread: in a CIFAR ResNet stage 0 runs at full resolution and holds more than
  half of them, and a single backward has freed the deeper modules' graphs by the time it reaches
  module 0, so the saving is the deeper modules' share (measure it: :mod:`kdlib.distill.lakd_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdlib import KDLibError
from kdlib.attention import align_spatial, map_distance, ndam_map
from kdlib.distill.base import Distiller, IncompatibleModelsError, check_finite, feature_shapes
from kdlib.distill.options import MethodOptions, option
from kdlib.distill.registry import register_distiller
from kdlib.features import FeatureTap, stage_names
from kdlib.models.base import channel_adapter

NDAM_MODES = ("loss", "weights", "both")


# --- losses (public so the chapter can show them and the tests can pin them) --------------------
def ndam_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """``mean((m(F_S) − m(F_T))²)`` after pooling the larger map to the smaller one's size."""
    return map_distance(fs, ft, ndam_map)


def ndam_weights(ft: torch.Tensor) -> torch.Tensor:
    """Spatial weights ``B×1×H×W`` from the teacher's NDAM map, rescaled to mean 1 per sample.

    METHODS.md writes ``H·W·m(F_T)``. That has mean 1 when ``m`` sums to 1; ``ndam_map`` is
    L2-normalised instead, and ``H·W·m`` would then scale ``L_lf`` by up to ``√(HW)`` (8–32× at
    CIFAR stage sizes), changing β's meaning per stage. ``m / mean(m)`` is ``H·W`` times the map
    normalised to sum 1: uniform attention gives weight 1 everywhere and plain MSE.
    """
    m = ndam_map(ft)
    w = m / m.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return w.view(ft.shape[0], 1, *ft.shape[-2:])


def local_feature_loss(fs: torch.Tensor, ft: torch.Tensor, ndam_weighted: bool = False) -> torch.Tensor:
    """``L_lf``: mean squared error of a (projected) student map against the teacher's map.

    The larger map is average-pooled to the smaller one's size first; with ``ndam_weighted`` each
    position's squared error is multiplied by :func:`ndam_weights` of the (pooled) teacher map.
    """
    if fs.shape[1] != ft.shape[1]:
        raise IncompatibleModelsError(
            f"L_lf needs equal channels after projection, got student {fs.shape[1]}, teacher {ft.shape[1]}"
        )
    fs, ft = align_spatial(fs, ft)
    if not ndam_weighted:
        return F.mse_loss(fs, ft)
    return ((fs - ft).pow(2) * ndam_weights(ft)).mean()


def channel_projection(c_student: int, c_teacher: int) -> nn.Module:
    """φ_k: 1×1 conv + BN when the channel counts differ, identity otherwise."""
    return nn.Identity() if c_student == c_teacher else channel_adapter(c_student, c_teacher)


def _refresh_epoch_mirror(module: LAKD, _incompatible_keys) -> None:
    module._epochs_done = int(module.epochs_done)


# --- the distiller ---------------------------------------------------------------------------------
@register_distiller("lakd")
class LAKD(Distiller):
    """Local modules with truncated gradients, layer-wise feature loss and NDAM (module docstring)."""

    @dataclass(frozen=True)
    class Options(MethodOptions):
        alpha: float = option(0.5, "weight μ of the cross-entropy (last module) against 1 − μ on the attention loss",
                              low=0.0, high=1.0)
        beta: float = option(30.0, "weight β of each module's distillation loss", low=0)
        att_weight: float = option(1000.0, "scale of the NDAM attention loss", low=0)
        truncate: bool = option(True, "stop gradients between local modules")
        ndam: str = option("loss", "how NDAM enters: as a loss, as position weights, or both", choices=NDAM_MODES)
        curriculum: int = option(0, "epochs between the release of consecutive modules (0: all at once)", low=0)
        memory_saving: bool = option(False, "backward module by module (needs truncate=True)")

        def check(self) -> None:
            if self.memory_saving and not self.truncate:
                raise KDLibError("LAKD memory_saving=True needs truncate=True (otherwise one graph spans all modules)")

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        o = self.options
        for attr in ("stem", "stages", "head"):
            if not hasattr(student, attr):
                raise IncompatibleModelsError(
                    f"LAKD cuts the student into stem/stages/head; {type(student).__name__} has no {attr!r}"
                )
        s_names, t_all = stage_names(student), stage_names(teacher)
        if len(t_all) < len(s_names):
            raise IncompatibleModelsError(
                f"LAKD needs a teacher stage per student module: student has {len(s_names)} stages, "
                f"teacher {len(t_all)}"
            )
        # Pair from the deepest stage backwards (as the other feature methods do).
        self.t_names = t_all[-len(s_names):]
        s_shapes = feature_shapes(student, s_names)
        t_shapes = feature_shapes(teacher, self.t_names)
        self.extras["proj"] = nn.ModuleList(
            channel_projection(s_shapes[s][0], t_shapes[t][0])
            for s, t in zip(s_names, self.t_names, strict=True)
        )
        self.alpha, self.beta, self.att_weight = o.alpha, o.beta, o.att_weight
        self.truncate, self.ndam, self.curriculum = o.truncate, o.ndam, o.curriculum
        self.memory_saving = o.memory_saving
        self.custom_backward = o.memory_saving
        # Finished epochs: a buffer so checkpoints carry it, mirrored in a Python int so that asking
        # which modules are released never waits on the GPU.
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self._epochs_done = 0
        self.register_load_state_dict_post_hook(_refresh_epoch_mirror)

    # --- local modules ---------------------------------------------------------------------------
    @property
    def num_modules(self) -> int:
        return len(self.student.stages)

    def local_module(self, k: int) -> list[nn.Module]:
        """The submodules that make up local module k (φ_k included)."""
        parts = ([self.student.stem] if k == 0 else []) + [self.student.stages[k]]
        if k == self.num_modules - 1:
            parts.append(self.student.head)
        return parts + [self.extras["proj"][k]]

    def module_parameters(self, k: int) -> list[nn.Parameter]:
        return [p for m in self.local_module(k) for p in m.parameters()]

    def module_loss_names(self, k: int) -> list[str]:
        """The loss terms that belong to module k (the ones that train it)."""
        names = [f"lf/{k}"]
        if self.ndam in ("loss", "both"):
            names.insert(0, f"att/{k}")
        if k == self.num_modules - 1:
            names.insert(0, "ce")
        return names

    def released(self, k: int) -> bool:
        """Whether module k's losses count yet (always, without a curriculum)."""
        return self._epochs_done >= self.curriculum * k

    def on_epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        self._epochs_done += 1
        self.epochs_done.fill_(self._epochs_done)

    # --- forward pieces --------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's paired stage outputs, from one no-grad forward (hooks live only for it)."""
        with FeatureTap(self.teacher, self.t_names) as tap:
            self.teacher(x)
            return tap.ordered()

    def _module_input(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return h.detach() if (k > 0 and self.truncate) else h

    def _run_module(self, k: int, h: torch.Tensor) -> torch.Tensor:
        if k == 0:
            h = self.student.stem(h)
        return self.student.stages[k](h)

    def _module_losses(
        self, k: int, fs: torch.Tensor, ft: torch.Tensor, logits: torch.Tensor | None, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Module k's weighted terms (see the table in the module docstring)."""
        if not self.released(k):
            zero = fs.new_zeros(())
            return {name: zero for name in self.module_loss_names(k)}
        weighted = self.ndam in ("weights", "both")
        terms = {}
        if logits is not None:
            terms["ce"] = self.alpha * F.cross_entropy(logits, y)
        if self.ndam in ("loss", "both"):
            terms[f"att/{k}"] = (1.0 - self.alpha) * self.att_weight * ndam_loss(fs, ft)
        terms[f"lf/{k}"] = self.beta * local_feature_loss(self.extras["proj"][k](fs), ft, weighted)
        return terms

    def _module_step(self, k, h, t_feat, y):
        """Module k's forward and losses; ``logits`` only for the last module."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.released(k)):
            fs = self._run_module(k, self._module_input(k, h))
            logits = self.student.head(fs) if k == self.num_modules - 1 else None
            return fs, logits, self._module_losses(k, fs, t_feat, logits, y)

    def forward_train(self, x, y):
        """All modules on one graph (truncated at module boundaries); one backward over the sum."""
        t_feats = self.teacher_features(x)
        losses, h, logits = {}, x, None
        for k in range(self.num_modules):
            h, logits, terms = self._module_step(k, h, t_feats[k], y)
            losses.update(terms)
        return logits, self._ordered(losses)

    def train_step(self, x, y, step: int = 0, forward=None, scaler=None):
        """Memory-saving mode: backward module by module; otherwise the base class's single backward."""
        if not self.memory_saving:
            return super().train_step(x, y, step, forward=forward, scaler=scaler)
        t_feats = self.teacher_features(x)
        losses, h = {}, x
        for k in range(self.num_modules):
            fs, logits, terms = self._module_step(k, h, t_feats[k], y)
            t_feats[k] = None  # now only module k's graph holds the teacher's map: freed by its backward
            if self.released(k):
                check_finite(terms, step)
                sum(terms.values()).backward()  # frees module k's graph before module k+1 runs
            losses.update({name: v.detach() for name, v in terms.items()})
            h = fs.detach()
            del fs, terms
        return logits.detach(), self._ordered(losses)

    def _ordered(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A fixed key order: ce, att/0.., lf/0.. (stable columns for logs and curves)."""
        def key(name: str):
            kind, _, k = name.partition("/")
            return (kind != "ce", kind, int(k or 0))

        return {name: losses[name] for name in sorted(losses, key=key)}
