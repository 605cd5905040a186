"""Training speed of kdlib's engine against the usual loop (issue "Performance", item 2).

Three loops train the same pair (resnet32x4 -> resnet8x4, KD) on CIFAR-100-shaped random data
(uint8 N×32×32×3 images, 100 classes) in one process, on one device:

- **reference**: the loop as RepDistiller writes it: fp32, a torch DataLoader over a Dataset of
  uint8 arrays that makes a PIL image per sample and applies torchvision's RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor and Normalize in ``--workers`` processes; ``.float().cuda()``; teacher
  forward under ``no_grad``; ``0.1·CE + 0.9·KD``; ``loss.item()`` and top-1/top-5 per step;
  ``cudnn.benchmark = True`` (RepDistiller's setting, for this loop only);
- **engine**: ``kdlib.train.train_epoch`` with ``create_distiller("kd", ...)``, the data as
  ``TensorBatches`` on the device (augmentation as one gather per batch), channels_last and the
  precision policy of ``kdlib.precision``: the code a ``kdlib`` run executes;
- **bound**: teacher forward plus student forward/backward/SGD step on one batch already on the
  device, same precision and layout as the engine, no data and no per-step host sync: no loop that
  computes this can be faster.

Then every distiller's engine step time and peak memory (``kdlib.memory.train_step_peak_memory``:
forward, losses and backward, above what was held before) relative to KD.

Timing: ``--warmup`` steps first (CUDA context, cuDNN, DataLoader workers filling their prefetch
queues: 8 workers × 2 batches are drained within the default 20), then a timed stretch bracketed by
``torch.cuda.synchronize``; images/s = timed samples / seconds. The issue's targets are printed as
met / NOT met: engine ≥ 3× reference at batch 64 and ≥ 5× at 512, engine ≥ 0.85× bound at 512,
every attention method ≤ 1.5× KD's step time. With other ``--batch-sizes`` the 64-targets apply to
the smallest batch measured and the 512-targets to the largest; the record says which.

    python benchmarks/bench_speed.py                     # full, on a GPU: results/speed_<device>.json
    python benchmarks/bench_speed.py --profile           # + torch.profiler top-15 ops of the engine step
    python benchmarks/bench_speed.py --quick             # seconds on a CPU; writes to the temp folder
    python benchmarks/bench_speed.py --cpu-precision     # the book pair on the CPU: fp32 NCHW vs the
                                                         # precision policy: results/speed_cpu.json

``--cpu-precision`` is the CPU's own benchmark (issue 19): it lives in ``speed_precision.py`` beside
this file. On a CPU, the three-loop comparison above writes ``results/speed_cpu_loops.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from kdlib import KDLibError
from kdlib.config import OptimConfig
from kdlib.data import CIFAR100_MEAN, CIFAR100_STD, TensorBatches
from kdlib.distill import create_distiller, kd_loss, list_distillers
from kdlib.memory import train_step_peak_memory
from kdlib.models import create_model, list_models
from kdlib.precision import Precision, resolve_precision
from kdlib.run_store import device_description, versions, write_json_atomic
from kdlib.train import lr_factor, make_optimizer, train_epoch

REPO = Path(__file__).resolve().parent.parent


def _sibling(name: str):
    """A module of benchmarks/ (not a package), registered so that its dataclasses resolve."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


speed_precision = _sibling("speed_precision")
NUM_CLASSES = 100
METHODS = ("vanilla", "kd", "fitnets", "at", "afd", "sakd", "aftkd", "sam_kd", "lakd")
ATTENTION_METHODS = ("at", "afd", "sakd", "aftkd", "sam_kd", "lakd")
OPTIM = OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)  # CRD's SGD; the lr value does not change speed
TAU, CE_WEIGHT, KD_WEIGHT = 4.0, 0.1, 0.9  # KD as CRD runs it

# The targets. ``batch``: "small" is stated for 64, "large" for 512.
REFERENCE_SMALL, REFERENCE_LARGE = 3.0, 5.0  # engine / reference images/s, at least
BOUND_FRACTION = 0.85  # engine / bound images/s at the large batch, at least ("within 15 %")
ATTENTION_OVER_KD = 1.5  # attention method step time / KD step time, at most

FULL = {"pair": ("resnet32x4", "resnet8x4"), "batch_sizes": (64, 512), "samples": 50_000, "warmup": 20,
        "timed_samples": 25_600, "distill_steps": 50, "workers": 8, "threads": None,
        "profile_steps": 10}
# One thread in quick mode: on a shared 2-core machine two contending threads were 20x slower than one.
QUICK = {"pair": ("resnet20", "resnet8"), "batch_sizes": (16, 32), "samples": 512, "warmup": 1,
         "timed_samples": 48, "distill_steps": 2, "workers": 0, "threads": 1, "profile_steps": 2}
MIN_TIMED_STEPS = 3


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures; stored in the record as is."""

    quick: bool
    device: str
    teacher: str
    student: str
    batch_sizes: tuple[int, ...]
    samples: int  # size of the random training set
    warmup: int  # untimed steps before every timed stretch
    timed_samples: int  # per loop and batch size: steps = max(3, ceil(timed_samples / batch))
    distill_steps: int  # timed steps per distiller and batch size
    workers: int  # DataLoader processes of the reference loop
    threads: int | None  # torch CPU threads; None leaves torch's default
    methods: tuple[str, ...]
    profile_steps: int
    seed: int = 0

    def timed_steps(self, batch: int) -> int:
        return max(MIN_TIMED_STEPS, math.ceil(self.timed_samples / batch))


# --- data ------------------------------------------------------------------------------------------
def random_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100-shaped training data: uint8 N×32×32×3 images (HWC, as in the pickles), int64 labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return images.numpy(), labels.numpy()


def on_device(images: np.ndarray, labels: np.ndarray, device: torch.device):
    """The engine's form of the same data: uint8 N×3×32×32 and long labels, resident on ``device``."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x.to(device), torch.from_numpy(labels).long().to(device)


def train_batches(images: torch.Tensor, labels: torch.Tensor, count: int, batch: int, seed: int):
    """``TensorBatches`` over exactly ``count`` samples (the data repeated when ``count`` exceeds it)."""
    idx = torch.arange(count, device=images.device) % len(labels)
    return TensorBatches(images[idx], labels[idx], batch, CIFAR100_MEAN, CIFAR100_STD, train=True, seed=seed)


class ArrayDataset(torch.utils.data.Dataset):
    """torchvision's CIFAR100 without the files: a PIL image per sample, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def reference_transform() -> transforms.Compose:
    """RepDistiller's CIFAR-100 training transform."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])


# --- timing helpers --------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(samples: int, steps: int, seconds: float) -> dict:
    return {"samples": samples, "steps": steps, "seconds": seconds, "images_per_s": samples / seconds,
            "step_s": seconds / steps}


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """Set ``torch.backends.cudnn.benchmark`` for one loop only, then restore it."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def fresh_pair(settings: Settings) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student), the same initial weights for every loop (speed needs no trained teacher)."""
    torch.manual_seed(settings.seed)
    return create_model(settings.teacher, NUM_CLASSES), create_model(settings.student, NUM_CLASSES)


# --- the reference loop ----------------------------------------------------------------------------
def reference_kd_loss(logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``gamma·CE + alpha·KD`` with CRD's KD weights."""
    return CE_WEIGHT * F.cross_entropy(logits, y) + KD_WEIGHT * kd_loss(logits, t_logits, TAU)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Correct predictions within the top k, as RepDistiller's ``accuracy`` counts them (on the device)."""
    _, pred = logits.topk(max(ks), 1, True, True)
    hits = pred.t().eq(y.view(1, -1))
    return [hits[:k].reshape(-1).float().sum() for k in ks]


def endless(loader):
    """Batches across epochs; each epoch starts a new DataLoader iterator (and workers), as training does."""
    while True:
        yield from loader


def time_reference(settings: Settings, data: tuple[np.ndarray, np.ndarray], batch: int,
                   device: torch.device) -> dict:
    teacher, student = fresh_pair(settings)
    teacher, student = teacher.to(device).eval(), student.to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=OPTIM.lr, momentum=OPTIM.momentum,
                                weight_decay=OPTIM.weight_decay)
    loader = torch.utils.data.DataLoader(ArrayDataset(*data, reference_transform()), batch_size=batch,
                                         shuffle=True, num_workers=settings.workers)
    meters = {"loss": 0.0, "top1": 0.0, "top5": 0.0}

    def step(x, y):
        x, y = x.float().to(device), y.to(device)
        logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = reference_kd_loss(logits, t_logits, y)
        top1, top5 = topk_correct(logits, y)
        meters["loss"] += loss.item() * y.numel()  # the per-step host sync every such loop has
        meters["top1"], meters["top5"] = meters["top1"] + top1, meters["top5"] + top5  # tensors: no sync
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    steps = settings.timed_steps(batch)
    with cudnn_benchmark(device.type == "cuda"):
        batches = endless(loader)
        for _ in range(settings.warmup):
            step(*next(batches))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(*next(batches))
        synchronize(device)
        seconds = time.perf_counter() - start
        batches.close()
    return throughput(steps * batch, steps, seconds)


# --- the engine ------------------------------------------------------------------------------------
def engine_precision(device: torch.device) -> Precision:
    """The engine's arithmetic on this device: the policy of kdlib.precision, channels_last."""
    return dataclasses.replace(resolve_precision(device), channels_last=True)


def build_engine(settings: Settings, method: str, device: torch.device, steps_per_epoch: int):
    """Distiller, optimiser and scheduler exactly as ``kdlib.train`` builds them."""
    teacher, student = fresh_pair(settings)
    distiller = create_distiller(method, student, teacher.to(device)).to(device)
    distiller = distiller.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(distiller.learnable_parameters(), OPTIM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(OPTIM, s, steps_per_epoch))
    return distiller, optimizer, scheduler


def time_engine(settings: Settings, method: str, data: tuple[torch.Tensor, torch.Tensor], batch: int,
                steps: int, device: torch.device, *, memory: bool = False) -> dict:
    """Timed ``train_epoch`` of ``steps`` batches after a warm-up epoch of ``settings.warmup`` batches."""
    precision = engine_precision(device)
    distiller, optimizer, scheduler = build_engine(settings, method, device, steps)
    if settings.warmup:
        warm = train_batches(*data, settings.warmup * batch, batch, settings.seed)
        train_epoch(distiller, warm, optimizer, scheduler, 0, len(warm), precision)
    timed = train_batches(*data, steps * batch, batch, settings.seed)
    synchronize(device)
    start = time.perf_counter()
    train_epoch(distiller, timed, optimizer, scheduler, 1, len(timed), precision)
    synchronize(device)
    result = throughput(steps * batch, steps, time.perf_counter() - start)
    if memory:
        x, y = next(iter(timed))
        with precision.autocast():
            result["peak_memory"] = train_step_peak_memory(
                distiller, x.contiguous(memory_format=torch.channels_last), y, warmup=0)
    return result


def profile_engine(settings: Settings, data, batch: int, device: torch.device) -> str:
    """torch.profiler's top-15 operators of KD engine steps (by self device time on CUDA, else self CPU)."""
    from torch.profiler import ProfilerActivity, profile

    precision = engine_precision(device)
    distiller, optimizer, scheduler = build_engine(settings, "kd", device, settings.profile_steps)
    warm = train_batches(*data, max(1, settings.warmup) * batch, batch, settings.seed)
    train_epoch(distiller, warm, optimizer, scheduler, 0, len(warm), precision)
    timed = train_batches(*data, settings.profile_steps * batch, batch, settings.seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_epoch(distiller, timed, optimizer, scheduler, 1, len(timed), precision)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    header = f"KD engine, batch {batch}, {settings.profile_steps} steps, sorted by {key}\n"
    return header + prof.key_averages().table(sort_by=key, row_limit=15)


# --- the model-only bound --------------------------------------------------------------------------
def time_bound(settings: Settings, data, batch: int, device: torch.device) -> dict:
    """Teacher forward + student forward/backward/step on one resident batch, no host sync per step."""
    precision = engine_precision(device)
    teacher, student = fresh_pair(settings)
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    student = student.to(device, memory_format=torch.channels_last).train()
    optimizer = make_optimizer(list(student.parameters()), OPTIM)
    x, y = next(iter(train_batches(*data, batch, batch, settings.seed)))
    x = x.contiguous(memory_format=torch.channels_last)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            with torch.no_grad():
                t_logits = teacher(x)
            loss = reference_kd_loss(student(x), t_logits, y)
        loss.backward()
        optimizer.step()

    steps = settings.timed_steps(batch)
    for _ in range(settings.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return throughput(steps * batch, steps, time.perf_counter() - start)


# --- ratios and verdicts ---------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compute_ratios(measurements: dict) -> dict:
    """Every ratio the issue asks for, from the measurements alone (keys are batch sizes as strings)."""
    ref, eng, bound, dist = (measurements[k] for k in ("reference", "engine", "bound", "distillers"))
    return {
        "engine_over_reference": {b: eng[b]["images_per_s"] / ref[b]["images_per_s"] for b in eng},
        "engine_over_bound": {b: eng[b]["images_per_s"] / bound[b]["images_per_s"] for b in eng},
        "step_time_over_kd": {
            b: {m: row["step_s"] / rows["kd"]["step_s"] for m, row in rows.items()}
            for b, rows in dist.items()
        },
        "peak_memory_over_kd": {
            b: {m: _ratio(row["peak_memory"]["bytes"], rows["kd"]["peak_memory"]["bytes"])
                for m, row in rows.items()}
            for b, rows in dist.items()
        },
    }


def _target(name: str, statement: str, batch: int, stated_for: int | None, value, threshold: float,
            at_least: bool, **extra) -> dict:
    met = None if value is None else (value >= threshold if at_least else value <= threshold)
    return {"name": name, "statement": statement, "batch_size": batch, "issue_batch_size": stated_for,
            "value": value, "threshold": threshold, "comparison": ">=" if at_least else "<=", "met": met,
            **extra}


def verdicts(ratios: dict, batch_sizes) -> list[dict]:
    """The issue's targets with their values; the 64-targets go to the smallest batch, 512 to the largest."""
    small, large = str(min(batch_sizes)), str(max(batch_sizes))
    targets = [
        _target("engine_vs_reference_small", f"engine >= {REFERENCE_SMALL:g}x reference images/s",
                int(small), 64, ratios["engine_over_reference"][small], REFERENCE_SMALL, True),
        _target("engine_vs_reference_large", f"engine >= {REFERENCE_LARGE:g}x reference images/s",
                int(large), 512, ratios["engine_over_reference"][large], REFERENCE_LARGE, True),
        _target("engine_vs_bound_large", "engine within 15 % of the model-only bound", int(large), 512,
                ratios["engine_over_bound"][large], BOUND_FRACTION, True),
    ]
    for b, rel in ratios["step_time_over_kd"].items():
        attention = {m: v for m, v in rel.items() if m in ATTENTION_METHODS}
        if attention:
            worst = max(attention, key=attention.get)
            targets.append(_target(
                f"attention_vs_kd_{b}", f"every attention method's step time <= {ATTENTION_OVER_KD:g}x KD's",
                int(b), None, attention[worst], ATTENTION_OVER_KD, False, worst_method=worst))
    return targets


# --- the run ---------------------------------------------------------------------------------------
def measure(settings: Settings, profile: bool = False) -> dict:
    device = torch.device(settings.device)
    images, labels = random_cifar(settings.samples, settings.seed)
    resident = on_device(images, labels, device)
    m = {"reference": {}, "engine": {}, "bound": {}, "distillers": {}}
    summaries = {}
    for batch in settings.batch_sizes:
        b = str(batch)
        print(f"batch {batch}: reference", flush=True)
        m["reference"][b] = time_reference(settings, (images, labels), batch, device)
        print(f"batch {batch}: engine, bound", flush=True)
        m["engine"][b] = time_engine(settings, "kd", resident, batch, settings.timed_steps(batch), device)
        m["bound"][b] = time_bound(settings, resident, batch, device)
        m["distillers"][b] = {}
        for method in settings.methods:
            print(f"batch {batch}: distiller {method}", flush=True)
            m["distillers"][b][method] = time_engine(
                settings, method, resident, batch, settings.distill_steps, device, memory=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if profile:
            summaries[b] = profile_engine(settings, resident, batch, device)
    ratios = compute_ratios(m)
    record = {
        "benchmark": "speed: kdlib engine vs the usual loop",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_description(device),
        "device_kind": device_kind(device),
        "versions": versions(),
        "settings": {**asdict(settings), "loops": loop_settings(settings, device)},
        "measurements": m,
        "ratios": ratios,
        "targets": verdicts(ratios, settings.batch_sizes),
    }
    if profile:
        record["profile_summary"] = summaries
    return record


def loop_settings(settings: Settings, device: torch.device) -> dict:
    """How each loop runs (precision, layout, data path), written next to the numbers."""
    cuda = device.type == "cuda"
    engine_arithmetic = engine_precision(device).name
    return {
        "reference": {"precision": "fp32", "channels_last": False, "cudnn_benchmark": cuda,
                      "data": f"DataLoader(shuffle, num_workers={settings.workers}, pin_memory=False) over "
                              "PIL + torchvision transforms", "per_step_sync": "loss.item()"},
        "engine": {"precision": engine_arithmetic, "channels_last": True,
                   "cudnn_benchmark": torch.backends.cudnn.benchmark,
                   "data": "TensorBatches on the device (crop + flip as one gather)",
                   "per_step_sync": "finite-loss check"},
        "bound": {"precision": engine_arithmetic, "channels_last": True,
                  "cudnn_benchmark": torch.backends.cudnn.benchmark,
                  "data": "one batch resident on the device", "per_step_sync": "none"},
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "torch_threads": torch.get_num_threads(),
        "timed_steps": {str(b): settings.timed_steps(b) for b in settings.batch_sizes},
        "peak_memory": "kdlib.memory.train_step_peak_memory: forward, losses and backward of one step, "
                       "above what was held before (parameters, optimiser state and batch excluded)",
    }


def device_kind(device: torch.device) -> str:
    """A file-name form of the device: ``cpu`` or the GPU's name (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# --- the figure and the printout -------------------------------------------------------------------
def plot(record: dict, path: Path) -> None:
    """Images/s of the three loops per batch size, and each distiller's step time relative to KD."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    m, ratios = record["measurements"], record["ratios"]
    batches = list(m["engine"])
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_speed, ax_rel = fig.subplots(1, 2, width_ratios=[1, 2])
    loops = [("reference", "reference (DataLoader + PIL, fp32)"), ("engine", "kdlib engine"),
             ("bound", "model-only bound")]
    width = 0.8 / len(loops)
    for i, (key, label) in enumerate(loops):
        xs = [j + (i - (len(loops) - 1) / 2) * width for j in range(len(batches))]
        ax_speed.bar(xs, [m[key][b]["images_per_s"] for b in batches], width, label=label)
    ax_speed.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax_speed.set_ylabel("training images / s")
    ax_speed.set_title(f"{record['settings']['teacher']} → {record['settings']['student']}, KD")
    ax_speed.legend(fontsize=8)

    methods = list(ratios["step_time_over_kd"][batches[0]])
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        xs = [j + (i - (len(batches) - 1) / 2) * width for j in range(len(methods))]
        ax_rel.bar(xs, [ratios["step_time_over_kd"][b][mm] for mm in methods], width, label=f"batch {b}")
    ax_rel.axhline(ATTENTION_OVER_KD, color="k", ls="--", lw=1, label=f"target ≤ {ATTENTION_OVER_KD:g}× KD")
    ax_rel.axhline(1.0, color="grey", lw=0.8)
    ax_rel.set_xticks(range(len(methods)), methods)
    ax_rel.set_ylabel("engine step time / KD step time")
    ax_rel.set_title("step time relative to KD")
    ax_rel.legend(fontsize=8)
    fig.suptitle(record["device"], fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def report(record: dict) -> str:
    m, r = record["measurements"], record["ratios"]
    lines = [f"device: {record['device']}", "", "batch  reference img/s  engine img/s  bound img/s  "
             "engine/reference  engine/bound"]
    for b in m["engine"]:
        lines.append(f"{b:>5}  {m['reference'][b]['images_per_s']:15,.0f}  "
                     f"{m['engine'][b]['images_per_s']:12,.0f}  {m['bound'][b]['images_per_s']:11,.0f}  "
                     f"{r['engine_over_reference'][b]:16.2f}  {r['engine_over_bound'][b]:12.2f}")
    lines += ["", "step time / KD (peak memory / KD) per batch size"]
    for b, rel in r["step_time_over_kd"].items():
        mem = r["peak_memory_over_kd"][b]
        cells = [f"{k} {v:.2f} ({mem[k]:.2f})" if mem[k] is not None else f"{k} {v:.2f}"
                 for k, v in rel.items()]
        lines.append(f"  batch {b}: " + ", ".join(cells))
    lines += ["", "targets:"]
    for t in record["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        stated = ""
        if t["issue_batch_size"] not in (None, t["batch_size"]):
            stated = f", stated for batch {t['issue_batch_size']}"
        worst = f" (worst: {t['worst_method']})" if "worst_method" in t else ""
        lines.append(f"  [{verdict}] {t['statement']} at batch {t['batch_size']}{stated}: "
                     f"{t['value']:.2f} {t['comparison']} {t['threshold']:g}{worst}")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU (the test suite's mode)")
    p.add_argument("--cpu-precision", action="store_true",
                   help="time the book pair's KD steps on the CPU: fp32 NCHW vs the precision policy")
    p.add_argument("--rounds", type=int, help="--cpu-precision: interleaved timed rounds (default 3; quick 2)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 64 512 (quick: 16 32)")
    p.add_argument("--pair", nargs=2, metavar=("TEACHER", "STUDENT"),
                   help="default resnet32x4 resnet8x4 (quick: resnet20 resnet8)")
    p.add_argument("--methods", nargs="+", help=f"distillers to compare (default: {' '.join(METHODS)})")
    p.add_argument("--samples", type=int, help="training-set size (default 50,000; quick 512)")
    p.add_argument("--warmup", type=int, help="untimed steps before each timed stretch (default 20; quick 1)")
    p.add_argument("--timed-samples", type=int, help="samples timed per loop and batch size (default 25,600)")
    p.add_argument("--distill-steps", type=int, help="timed steps per distiller (default 50; quick 2)")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (default 8; quick 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; quick: 1)")
    p.add_argument("--profile", action="store_true", help="add torch.profiler's top-15 ops per engine step")
    p.add_argument("--out", help="JSON record (default results/speed_<device>.json; quick: the temp folder)")
    p.add_argument("--figure", help="PNG (default book/_static/speed_<device>.png; quick: the temp folder)")
    return p.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Defaults for the mode, then every value checked (a one-line KDLibError for bad input)."""
    d = QUICK if args.quick else FULL
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KDLibError(f"unknown device {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise KDLibError(f"the speed benchmark runs on cpu or cuda, not {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KDLibError("--device cuda asked for, but torch sees no CUDA device")
    teacher, student = args.pair or d["pair"]
    for name in (teacher, student):
        if name not in list_models():
            raise KDLibError(f"unknown model {name!r} in --pair; available: {', '.join(list_models())}")
    methods = tuple(args.methods or METHODS)
    unknown = sorted(set(methods) - set(list_distillers()))
    if unknown:
        raise KDLibError(f"unknown method(s) {unknown}; available: {', '.join(list_distillers())}")
    if "kd" not in methods:
        methods = ("kd", *methods)  # every step time is relative to KD's
    settings = Settings(
        quick=args.quick, device=str(dev), teacher=teacher, student=student,
        batch_sizes=tuple(dict.fromkeys(args.batch_sizes or d["batch_sizes"])),
        samples=_pick(args.samples, d["samples"]), warmup=_pick(args.warmup, d["warmup"]),
        timed_samples=_pick(args.timed_samples, d["timed_samples"]),
        distill_steps=_pick(args.distill_steps, d["distill_steps"]),
        workers=_pick(args.workers, d["workers"]), threads=_pick(args.threads, d["threads"]),
        methods=tuple(dict.fromkeys(methods)), profile_steps=d["profile_steps"],
    )
    checks = (("batch size", min(settings.batch_sizes), 1), ("--samples", settings.samples, 1),
              ("--warmup", settings.warmup, 0), ("--timed-samples", settings.timed_samples, 1),
              ("--distill-steps", settings.distill_steps, 1), ("--workers", settings.workers, 0),
              ("--threads", settings.threads or 1, 1))
    for name, value, low in checks:
        if value < low:
            raise KDLibError(f"{name} must be >= {low}, got {value}")
    return settings


def _pick(value, default):
    return default if value is None else value


def output_paths(args: argparse.Namespace, settings: Settings) -> tuple[Path, Path]:
    """(record, figure). Quick runs default to the temp folder: never into results/ or the book."""
    if isinstance(settings, speed_precision.PrecisionSettings):
        kind = "cpu"  # the CPU's record: results/speed_cpu.json
    else:  # on a CPU the three loops take the second name: the CPU's record is the precision one
        kind = device_kind(torch.device(settings.device))
        kind = f"{kind}_loops" if kind == "cpu" else kind
    if settings.quick:
        tmp = Path(tempfile.gettempdir())
        defaults = (tmp / f"kdlib_speed_{kind}_quick.json", tmp / f"kdlib_speed_{kind}_quick.png")
    else:
        defaults = (REPO / "results" / f"speed_{kind}.json", REPO / "book" / "_static" / f"speed_{kind}.png")
    return Path(args.out) if args.out else defaults[0], Path(args.figure) if args.figure else defaults[1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_precision:
        settings = speed_precision.resolve(args)
        run, draw, describe = speed_precision.measure, speed_precision.plot, speed_precision.report
    else:
        if args.rounds is not None:
            raise KDLibError("--rounds applies to --cpu-precision only")
        settings = resolve_settings(args)
        run, draw, describe = (lambda s: measure(s, profile=args.profile)), plot, report
    out, figure = output_paths(args, settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    record = run(settings)
    write_json_atomic(out, record)
    draw(record, figure)
    print(describe(record))
    print(f"\nrecord: {out}\nfigure: {figure}")
    return record


if __name__ == "__main__":
    try:
        main()
    except KDLibError as err:
        sys.exit(f"error: {err}")
