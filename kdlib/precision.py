"""The device's arithmetic precision as a policy, in one place.

``resolve_precision(device)`` picks what a run computes in, and the engine, the benchmarks and the
record all take it from here:

| device                                      | ``auto`` picks   | layout         |
|---------------------------------------------|------------------|----------------|
| CPU with native bf16 (AVX512-BF16 or AMX)   | ``bf16-autocast``| channels_last  |
| any other CPU                               | ``fp32``         | channels_last  |
| CUDA, compute capability ≥ 8.0 (Ampere on)  | ``bf16-autocast``| channels_last  |
| CUDA below 8.0 (T4, V100)                   | ``fp16-autocast``, with ``torch.amp.GradScaler`` | channels_last |

Why: on a 2-core AMD EPYC with AVX512-BF16, one KD step of resnet14 → resnet8 at batch 64 ran at
640 images/s in fp32 NCHW, 930 in fp32 channels_last and 1,429 with channels_last + bf16 autocast
(issue 19). On CUDA, bf16 needs no loss scaling; GPUs below compute capability 8.0 have no bf16
matrix units (torch emulates bf16 there, slowly), so they get fp16, whose narrow exponent needs a
GradScaler.

A request (argument, else ``$KDLIB_PRECISION``) of ``fp32``, ``bf16`` or ``fp16`` forces one:

- ``bf16`` on a CPU without native bf16, or on a GPU below 8.0, is allowed: torch computes it
  correctly by emulation, only slower (a warning says so). A forced choice is an experiment, and
  the record names the precision either way.
- ``fp16`` on a CPU is refused (a :class:`KDLibError`): CPUs have no fp16 training path worth
  running, and a GradScaler would be needed that the CPU engine does not use.
- other device types (``mps``, ...) run in fp32; forcing bf16 or fp16 there is refused.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kdlib import KDLibError

ENV_VAR = "KDLIB_PRECISION"
REQUESTS = ("auto", "fp32", "bf16", "fp16")
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags with bf16 dot-product instructions
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bf16 tensor cores


@dataclass(frozen=True)
class Precision:
    """What a run computes in: the autocast dtype (None for plain fp32) and the memory layout."""

    name: str  # "fp32" | "bf16-autocast" | "fp16-autocast"
    device_type: str  # "cpu" | "cuda" (or another torch device type, fp32 only)
    dtype: torch.dtype | None  # autocast dtype; None for fp32
    channels_last: bool  # memory layout chosen with it

    def autocast(self):
        """The context the forward pass (and loss) runs in: ``torch.autocast`` or a no-op for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh ``torch.amp.GradScaler`` for fp16 on CUDA (fp16 gradients underflow); else None."""
        if self.dtype == torch.float16 and self.device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


FP32_CPU = Precision("fp32", "cpu", None, channels_last=True)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16), read once per process.

    Linux: the ``flags`` line of /proc/cpuinfo. Elsewhere: torch's own cpuinfo query.
    (``torch.backends.cpu.get_cpu_capability()`` says only "AVX512": it does not tell bf16 apart.)
    """
    flags = _cpuinfo_flags(CPUINFO)
    if flags is not None:
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    return _torch_reports_native_bf16()


def _cpuinfo_flags(path: Path) -> set[str] | None:
    """The CPU flags of the first processor in ``path``; None if there is no such file or line."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def _torch_reports_native_bf16() -> bool:
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    if caps is not None:
        found = caps()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def requested_precision(requested: str | None = None) -> str:
    """The request: the argument, else ``$KDLIB_PRECISION``, else ``auto``; checked."""
    source = "precision"
    if requested is None:
        requested, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    value = requested.strip().lower()
    if value not in REQUESTS:
        raise KDLibError(f"{source} must be one of {', '.join(REQUESTS)}, got {requested!r}")
    return value


def resolve_precision(device: torch.device | str, requested: str | None = None) -> Precision:
    """The precision a run on ``device`` uses: the policy above for ``auto``, else the one forced."""
    device = torch.device(device)
    choice = requested_precision(requested)
    if device.type == "cpu":
        return _cpu_precision(choice)
    if device.type == "cuda":
        return _cuda_precision(device, choice)
    if choice in ("auto", "fp32"):
        return Precision("fp32", device.type, None, channels_last=False)
    raise KDLibError(f"precision {choice!r} is not supported on device type {device.type!r}; use fp32")


def _cpu_precision(choice: str) -> Precision:
    if choice == "fp16":
        raise KDLibError("precision fp16 needs a CUDA device; on a CPU use bf16 or fp32")
    native = cpu_has_native_bf16()
    if choice == "bf16" or (choice == "auto" and native):
        if not native:
            warnings.warn("bf16 forced on a CPU without AVX512-BF16/AMX: torch emulates it (correct, slower)",
                          stacklevel=3)
        return Precision("bf16-autocast", "cpu", torch.bfloat16, channels_last=True)
    return FP32_CPU


def _cuda_precision(device: torch.device, choice: str) -> Precision:
    if choice == "fp32":
        return Precision("fp32", "cuda", None, channels_last=True)
    if choice == "fp16":
        return Precision("fp16-autocast", "cuda", torch.float16, channels_last=True)
    capability = tuple(torch.cuda.get_device_capability(device))
    has_bf16 = capability >= BF16_MIN_CAPABILITY
    if choice == "auto" and not has_bf16:
        return Precision("fp16-autocast", "cuda", torch.float16, channels_last=True)
    if not has_bf16:
        warnings.warn(f"bf16 forced on a GPU of compute capability {capability[0]}.{capability[1]} (< 8.0): "
                      "torch emulates it (correct, slower)", stacklevel=3)
    return Precision("bf16-autocast", "cuda", torch.bfloat16, channels_last=True)
