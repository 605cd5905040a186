"""TEMPORARY minimal precision policy (the helper's module replaces it)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from kdlib import KDLibError


@dataclass(frozen=True)
class Precision:
    name: str
    device_type: str
    dtype: torch.dtype | None
    channels_last: bool
    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
    def grad_scaler(self):
        if self.name == "fp16-autocast" and self.device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

def resolve_precision(device, requested=None):
    device = torch.device(device)
    requested = requested or os.environ.get("KDLIB_PRECISION") or "auto"
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
        else:
            requested = "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "fp32":
        return Precision("fp32", device.type, None, True)
    if requested == "bf16":
        return Precision("bf16-autocast", device.type, torch.bfloat16, True)
    if requested == "fp16":
        if device.type != "cuda":
            raise KDLibError("fp16 autocast needs a CUDA device")
        return Precision("fp16-autocast", device.type, torch.float16, True)
    raise KDLibError(f"unknown precision {requested!r}; choose auto, fp32, bf16 or fp16")
