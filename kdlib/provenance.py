"""The last cell of every notebook: what produced the stored outputs."""

from __future__ import annotations

import torch

import kdlib


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def provenance_line(profile: str) -> str:
    """``kdlib <ver> | profile <p> | torch <ver> | device <...>`` — tests/test_provenance.py reads it."""
    return f"kdlib {kdlib.__version__} | profile {profile} | torch {torch.__version__} | device {device_name()}"


def provenance(profile: str, records: list[dict] | None = None) -> None:
    """Print the provenance line and the run records a notebook used."""
    print(provenance_line(profile))
    for r in records or []:
        result = f"top-1 last {r['top1_last']:.2f} %" if r["top1_last"] is not None else r.get("status", "?")
        print(f"  run {r['name']}: {result}, {r['device']}, {r['created']}")
