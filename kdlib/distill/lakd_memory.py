"""LAKD's memory claim, measured: one training step's peak memory for LAKD and end-to-end KD.

:func:`lakd_memory_comparison` trains one step of LAKD with module-wise backward
(``memory_saving=True``), of LAKD with one backward through the whole student, and of KD, on the
same pair and batch, and reports each peak (:func:`kdlib.memory.train_step_peak_memory`) relative
to KD's. Chapter 13 and ``tests/test_lakd.py`` use it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdlib import KDLibError
from kdlib.distill.registry import create_distiller  # "kd" and "lakd" are registered by kdlib.distill
from kdlib.memory import MIB, train_step_peak_memory

#: (label, method, mode, options) of each row of :func:`lakd_memory_comparison`.
COMPARED = (
    ("LAKD, memory-saving", "lakd", "memory-saving", {"memory_saving": True}),
    ("LAKD, single backward", "lakd", "single-backward", {"memory_saving": False}),
    ("KD, end-to-end", "kd", "end-to-end", {}),
)


def lakd_memory_comparison(
    student: nn.Module,
    teacher: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    lakd_options: dict | None = None,
    kd_options: dict | None = None,
    warmup: int = 1,
) -> list[dict]:
    """One training step's peak memory for LAKD (memory-saving), LAKD (single backward) and KD.

    Same pair, same batch; each row's student is a fresh copy of ``student`` (left untouched), on
    the student's device. Rows: ``label, method, mode, peak_bytes, peak_mib, relative_to_kd,
    measure, device, batch_size``.
    """
    lakd_options = dict(lakd_options or {})
    if "memory_saving" in lakd_options:
        raise KDLibError("lakd_memory_comparison sets memory_saving itself; drop it from lakd_options")
    device = next(student.parameters()).device
    x, y = (t.to(device) for t in batch)
    rows = []
    for label, method, mode, options in COMPARED:
        opts = {**lakd_options, **options} if method == "lakd" else dict(kd_options or {})
        distiller = create_distiller(method, copy.deepcopy(student), teacher, **opts).to(device)
        measured = train_step_peak_memory(distiller, x, y, warmup)
        rows.append({
            "label": label,
            "method": method,
            "mode": mode,
            "peak_bytes": measured["bytes"],
            "peak_mib": measured["bytes"] / MIB,
            "measure": measured["method"],
            "device": measured["device"],
            "batch_size": int(x.shape[0]),
        })
        del distiller
    kd_bytes = rows[-1]["peak_bytes"]
    for row in rows:
        row["relative_to_kd"] = row["peak_bytes"] / kd_bytes if kd_bytes else float("nan")
    return rows
