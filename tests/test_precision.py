"""The precision policy (kdlib/precision.py): detection, the choice per device, forced requests, errors.

CPU features and CUDA capabilities are monkeypatched, so every branch runs on any CPU; the tests
marked ``cuda`` run on a real GPU only (benchmarks/gpu_check.sh runs them).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from kdlib import KDLibError, precision
from kdlib.precision import Precision, cpu_has_native_bf16, resolve_precision

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
"""


@pytest.fixture(autouse=True)
def _fresh_detection(monkeypatch):
    """No request in the environment, and the cached CPU detection cleared before and after."""
    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    cpu_has_native_bf16.cache_clear()
    yield
    cpu_has_native_bf16.cache_clear()


def _native(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)


def _capability(monkeypatch, major: int, minor: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))


# --- detection -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    ("avx512_bf16 avx512_vnni", True),
    ("amx_bf16 amx_tile", True),
    ("avx512_vnni avx512_fp16", False),  # AVX-512 alone is not bf16
    ("", False),
])
def test_cpuinfo_flags_decide_native_bf16(tmp_path, monkeypatch, extra, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    monkeypatch.setattr(precision, "CPUINFO", path)
    assert cpu_has_native_bf16() is expected


def test_without_cpuinfo_torch_is_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True},
                        raising=False)
    assert cpu_has_native_bf16() is True
    cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False}, raising=False)
    assert cpu_has_native_bf16() is False


def test_detection_is_cached(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra="avx512_bf16"))
    monkeypatch.setattr(precision, "CPUINFO", path)
    assert cpu_has_native_bf16() is True
    path.write_text(CPUINFO.format(extra=""))  # a changed file is not read again in this process
    assert cpu_has_native_bf16() is True


def test_detection_agrees_with_torch_on_this_machine():
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is None or not precision.CPUINFO.exists():
        pytest.skip("needs /proc/cpuinfo and torch.cpu.get_capabilities (torch >= 2.10)")
    found = caps()
    assert cpu_has_native_bf16() == bool(found.get("avx512_bf16") or found.get("amx_bf16"))


# --- the policy ------------------------------------------------------------------------------------
def test_cpu_with_native_bf16_gets_bf16_and_channels_last(monkeypatch):
    _native(monkeypatch, True)
    p = resolve_precision(torch.device("cpu"))
    assert p == Precision("bf16-autocast", "cpu", torch.bfloat16, channels_last=True)
    assert p.grad_scaler() is None


def test_other_cpus_get_fp32(monkeypatch):
    _native(monkeypatch, False)
    for requested in (None, "auto", "fp32"):
        p = resolve_precision("cpu", requested)
        assert (p.name, p.dtype, p.device_type) == ("fp32", None, "cpu"), requested
        assert p.grad_scaler() is None


@pytest.mark.parametrize("capability, name, dtype", [
    ((9, 0), "bf16-autocast", torch.bfloat16),  # H100 / H200
    ((8, 0), "bf16-autocast", torch.bfloat16),  # A100: the boundary is bf16
    ((7, 5), "fp16-autocast", torch.float16),  # T4 (Colab)
    ((7, 0), "fp16-autocast", torch.float16),  # V100
])
def test_cuda_follows_compute_capability(monkeypatch, capability, name, dtype):
    _capability(monkeypatch, *capability)
    p = resolve_precision(torch.device("cuda", 0))
    assert (p.name, p.device_type, p.dtype, p.channels_last) == (name, "cuda", dtype, True)


def test_fp16_on_cuda_comes_with_a_grad_scaler(monkeypatch):
    _capability(monkeypatch, 7, 5)
    p = resolve_precision("cuda")
    with warnings.catch_warnings():  # without a GPU torch warns that it disables the scaler
        warnings.simplefilter("ignore")
        scaler = p.grad_scaler()
    assert isinstance(scaler, torch.amp.GradScaler)
    _capability(monkeypatch, 9, 0)
    assert resolve_precision("cuda").grad_scaler() is None


def test_forced_requests(monkeypatch):
    _native(monkeypatch, True)
    assert resolve_precision("cpu", "fp32").name == "fp32"
    _capability(monkeypatch, 9, 0)
    assert resolve_precision("cuda", "fp16").name == "fp16-autocast"
    assert resolve_precision("cuda", "fp32") == Precision("fp32", "cuda", None, channels_last=True)
    assert resolve_precision("cuda", " BF16 ").name == "bf16-autocast"  # case and spaces do not matter


def test_emulated_bf16_is_allowed_with_a_warning(monkeypatch):
    _native(monkeypatch, False)
    with pytest.warns(UserWarning, match="emulates"):
        assert resolve_precision("cpu", "bf16").name == "bf16-autocast"
    _capability(monkeypatch, 7, 5)
    with pytest.warns(UserWarning, match="capability 7.5"):
        assert resolve_precision("cuda", "bf16").dtype == torch.bfloat16


def test_env_var_is_read_only_without_an_argument(monkeypatch):
    _native(monkeypatch, True)
    monkeypatch.setenv(precision.ENV_VAR, "fp32")
    assert resolve_precision("cpu").name == "fp32"
    assert resolve_precision("cpu", "auto").name == "bf16-autocast"  # the argument wins
    monkeypatch.setenv(precision.ENV_VAR, "auto")
    assert resolve_precision("cpu").name == "bf16-autocast"
    monkeypatch.setenv(precision.ENV_VAR, "")  # empty: as if unset
    assert resolve_precision("cpu").name == "bf16-autocast"


@pytest.mark.parametrize("device, requested, env, message", [
    ("cpu", "fp16", None, "fp16 needs a CUDA device"),
    ("cpu", "half", None, "precision must be one of auto, fp32, bf16, fp16, got 'half'"),
    ("cpu", None, "tf32", "KDLIB_PRECISION must be one of auto, fp32, bf16, fp16, got 'tf32'"),
    ("meta", "bf16", None, "not supported on device type 'meta'"),
])
def test_impossible_requests_are_one_line_errors(monkeypatch, device, requested, env, message):
    if env is not None:
        monkeypatch.setenv(precision.ENV_VAR, env)
    with pytest.raises(KDLibError, match=message) as info:
        resolve_precision(device, requested)
    assert "\n" not in str(info.value)


def test_other_device_types_run_fp32():
    p = resolve_precision("meta")
    assert (p.name, p.dtype, p.device_type) == ("fp32", None, "meta")


# --- what the contexts do --------------------------------------------------------------------------
def test_bf16_autocast_makes_cpu_matmuls_bf16(monkeypatch):
    _native(monkeypatch, True)
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    conv = torch.nn.Conv2d(3, 4, 3)
    with resolve_precision("cpu").autocast():
        assert (a @ b).dtype == torch.bfloat16
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside the context


def test_fp32_autocast_is_a_no_op(monkeypatch):
    _native(monkeypatch, False)
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with resolve_precision("cpu").autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert torch.equal(a @ b, torch.mm(a, b)) and (a @ b).dtype == torch.float32


def test_bf16_step_matches_fp32_to_bf16_accuracy(monkeypatch):
    """A training step's loss under the CPU policy is the fp32 loss to about bf16's 3 digits."""
    _native(monkeypatch, True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    fp32 = torch.nn.functional.cross_entropy(model(x), y)
    with resolve_precision("cpu").autocast():
        bf16 = torch.nn.functional.cross_entropy(model(x), y)
    assert bf16.dtype == torch.float32  # cross-entropy runs in fp32 under CPU autocast
    assert abs(bf16.item() - fp32.item()) < 2e-2 * abs(fp32.item()) and bf16.item() != fp32.item()


# --- on a real GPU (skipped on CPU CI; benchmarks/gpu_check.sh runs them) ------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_policy_on_the_real_device():
    p = resolve_precision("cuda")
    major, _ = torch.cuda.get_device_capability()
    assert p.name == ("bf16-autocast" if major >= 8 else "fp16-autocast")
    a, b = torch.randn(64, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    with p.autocast():
        assert (a @ b).dtype == p.dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp16_grad_scaler_steps_on_the_real_device():
    p = resolve_precision("cuda", "fp16")
    model = torch.nn.Linear(16, 4).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = p.grad_scaler()
    before = model.weight.detach().clone()
    with p.autocast():
        loss = model(torch.randn(8, 16, device="cuda")).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.is_enabled() and not torch.equal(before, model.weight.detach())
