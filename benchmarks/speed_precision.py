"""The CPU mode of the speed benchmark (``bench_speed.py --cpu-precision``): fp32 NCHW against the policy.

Issue 19 item 1: the book trains on a CPU, so its speed is the CPU's. This times the book pair's KD
step loop (resnet14 → resnet8, batch 64, 10 classes) under three variants, in one process:

- **fp32-nchw**: fp32, the default NCHW layout (the engine before the precision policy);
- **fp32-channels_last**: fp32, channels_last model and batches (the layout alone);
- **policy**: ``kdlib.precision.resolve_precision("cpu")``: channels_last + bf16 autocast on CPUs with
  native bf16 (AVX512-BF16/AMX), fp32 channels_last elsewhere (then this variant is not timed twice).

Each step is the engine's: the batch from ``TensorBatches`` (crop + flip as one gather), made
channels_last if the variant says so, ``zero_grad(set_to_none=True)``, ``distiller.train_step`` (KD's
forward, the finite check, backward) under the variant's autocast, SGD and scheduler steps, loss
sums kept on the device and synced once per timed stretch: ``kdlib.train.train_epoch`` itself.

The machine is shared (other processes come and go, and a 2-thread process on 2 busy cores loses
far more than half its speed), so the variants are timed in ``rounds`` short interleaved stretches
(every variant once per round, in reversed order every other round) and a variant's images/s is its
best round, as ``timeit`` reports the minimum time: contention only ever slows a round down, so the
fastest one is the least disturbed. The medians and every round are in the record too, with the
load average before and after.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kdlib import KDLibError
from kdlib.data import SHAPES_MEAN, SHAPES_STD, TensorBatches
from kdlib.distill import create_distiller
from kdlib.models import create_model, list_models
from kdlib.precision import FP32_CPU, Precision, cpu_has_native_bf16, resolve_precision
from kdlib.profiles import get_profile
from kdlib.run_store import device_description, versions
from kdlib.train import lr_factor, make_optimizer, train_epoch

TARGET = 1.8  # policy images/s over fp32 NCHW images/s, at least (issue 19's acceptance)
FP32_NCHW = Precision("fp32", "cpu", None, channels_last=False)

_BOOK = get_profile("book")
FULL = {"pair": (_BOOK.teacher, _BOOK.student), "batch": _BOOK.data.batch_size, "samples": _BOOK.data.train_size,
        "warmup": 10, "timed_steps": 30, "rounds": 6, "threads": 2}
QUICK = {"pair": ("resnet8", "resnet8"), "batch": 8, "samples": 64, "warmup": 1, "timed_steps": 3, "rounds": 2,
         "threads": 1}


@dataclass(frozen=True)
class PrecisionSettings:
    """What one CPU-precision run measures; stored in the record as is."""

    quick: bool
    teacher: str
    student: str
    num_classes: int
    batch: int
    samples: int  # size of the random training set (the book's 4,000)
    warmup: int  # untimed steps per variant before its first round
    timed_steps: int  # steps per variant and round
    rounds: int
    threads: int
    seed: int = 0


def resolve(args) -> PrecisionSettings:
    """The mode's defaults, then ``bench_speed``'s arguments that apply to it, checked."""
    d = QUICK if args.quick else FULL
    for flag, value in (("--methods", args.methods), ("--profile", args.profile or None),
                        ("--workers", args.workers), ("--distill-steps", args.distill_steps)):
        if value is not None:
            raise KDLibError(f"{flag} does not apply to --cpu-precision")
    if args.device not in (None, "cpu"):
        raise KDLibError(f"--cpu-precision times the CPU; got --device {args.device}")
    teacher, student = args.pair or d["pair"]
    for name in (teacher, student):
        if name not in list_models():
            raise KDLibError(f"unknown model {name!r} in --pair; available: {', '.join(list_models())}")
    if args.batch_sizes is not None and len(args.batch_sizes) != 1:
        raise KDLibError("--cpu-precision times one batch size; give one to --batch-sizes")
    batch = args.batch_sizes[0] if args.batch_sizes else d["batch"]
    timed = d["timed_steps"] if args.timed_samples is None else math.ceil(args.timed_samples / max(1, batch))
    settings = PrecisionSettings(
        quick=args.quick, teacher=teacher, student=student, num_classes=_BOOK.data.num_classes, batch=batch,
        samples=_pick(args.samples, d["samples"]), warmup=_pick(args.warmup, d["warmup"]), timed_steps=timed,
        rounds=_pick(args.rounds, d["rounds"]), threads=_pick(args.threads, d["threads"]),
    )
    for name, value, low in (("batch size", batch, 1), ("--samples", settings.samples, 1),
                             ("--warmup", settings.warmup, 0), ("--timed-samples", args.timed_samples or 1, 1),
                             ("--rounds", settings.rounds, 1), ("--threads", settings.threads, 1)):
        if value < low:
            raise KDLibError(f"{name} must be >= {low}, got {value}")
    return settings


def _pick(value, default):
    return default if value is None else value


def variants() -> dict[str, Precision]:
    """The variants timed, in order; the policy is left out where it is fp32 channels_last already."""
    out = {"fp32-nchw": FP32_NCHW, "fp32-channels_last": FP32_CPU}
    policy = resolve_precision("cpu")
    if policy not in out.values():
        out["policy"] = policy
    return out


def policy_key(found: dict[str, Precision]) -> str:
    return "policy" if "policy" in found else "fp32-channels_last"


# --- the step loop ---------------------------------------------------------------------------------
def random_data(settings: PrecisionSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×3×32×32 images and labels: the book's shapes in size (content does not change speed)."""
    g = torch.Generator().manual_seed(settings.seed)
    images = torch.randint(0, 256, (settings.samples, 3, 32, 32), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, settings.num_classes, (settings.samples,), generator=g)


def batches(data, steps: int, batch: int, seed: int) -> TensorBatches:
    """``TensorBatches`` over exactly ``steps`` full batches (the data repeated where it is too small)."""
    images, labels = data
    idx = torch.arange(steps * batch) % len(labels)
    return TensorBatches(images[idx], labels[idx], batch, SHAPES_MEAN, SHAPES_STD, train=True, seed=seed)


class KDLoop:
    """The KD distiller, optimiser and scheduler of one variant, built as ``kdlib.train`` builds them."""

    def __init__(self, settings: PrecisionSettings, precision: Precision):
        torch.manual_seed(settings.seed)  # the same initial weights in every variant
        teacher = create_model(settings.teacher, settings.num_classes)
        student = create_model(settings.student, settings.num_classes)
        self.distiller = create_distiller("kd", student, teacher)
        if precision.channels_last:
            self.distiller = self.distiller.to(memory_format=torch.channels_last)
        optim = _BOOK.student_optim
        self.optimizer = make_optimizer(self.distiller.learnable_parameters(), optim)
        steps = settings.warmup + settings.rounds * settings.timed_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(optim, s, steps))
        self.precision, self.epoch = precision, 0

    def run(self, loader: TensorBatches) -> list[float]:
        """One ``kdlib`` training epoch over ``loader``; the mean loss terms (the stretch's one host sync)."""
        row = train_epoch(self.distiller, loader, self.optimizer, self.scheduler, self.epoch, len(loader),
                          self.precision)
        self.epoch += 1
        return list(row["losses"].values())


def time_stretch(loop: KDLoop, loader: TensorBatches) -> dict:
    start = time.perf_counter()
    losses = loop.run(loader)
    seconds = time.perf_counter() - start
    samples = len(loader) * loader.batch_size
    return {"samples": samples, "steps": len(loader), "seconds": seconds, "images_per_s": samples / seconds,
            "step_s": seconds / len(loader), "mean_loss": sum(losses)}


def summarise(rounds: list[dict]) -> dict:
    """A variant's rounds, its best round (the figure reported) and its median."""
    speeds = [r["images_per_s"] for r in rounds]
    return {"rounds": rounds, "images_per_s": max(speeds), "step_s": min(r["step_s"] for r in rounds),
            "median_images_per_s": statistics.median(speeds)}


def measure(settings: PrecisionSettings) -> dict:
    """Warm every variant up, time them in interleaved rounds, and build the record."""
    found = variants()
    data = random_data(settings)
    load_before = os.getloadavg()
    loops = {name: KDLoop(settings, p) for name, p in found.items()}
    for name, loop in loops.items():
        print(f"warm-up: {name}", flush=True)
        if settings.warmup:
            loop.run(batches(data, settings.warmup, settings.batch, settings.seed))
    rounds: dict[str, list[dict]] = {name: [] for name in loops}
    for r in range(settings.rounds):
        order = list(loops) if r % 2 == 0 else list(reversed(loops))  # no variant always runs first
        for name in order:
            loop = loops[name]
            rounds[name].append(time_stretch(loop, batches(data, settings.timed_steps, settings.batch,
                                                           settings.seed + 1 + r)))
            print(f"round {r + 1}: {name} {rounds[name][-1]['images_per_s']:,.0f} images/s", flush=True)
    m = {name: summarise(rows) for name, rows in rounds.items()}
    return build_record(settings, found, m, {"before": list(load_before), "after": list(os.getloadavg())})


# --- the record ------------------------------------------------------------------------------------
def compute_ratios(measurements: dict, policy: str) -> dict:
    """Each variant's best (and median) images/s over fp32 NCHW's, and the policy's ratio per round."""
    base = measurements["fp32-nchw"]
    return {
        "over_fp32_nchw": {k: v["images_per_s"] / base["images_per_s"] for k, v in measurements.items()},
        "over_fp32_nchw_median": {k: v["median_images_per_s"] / base["median_images_per_s"]
                                  for k, v in measurements.items()},
        "policy_over_fp32_nchw_per_round": [
            p["images_per_s"] / b["images_per_s"]
            for p, b in zip(measurements[policy]["rounds"], base["rounds"], strict=True)
        ],
    }


def verdict(ratio: float) -> dict:
    return {"name": "policy_vs_fp32_nchw", "statement": f"policy >= {TARGET:g}x fp32 NCHW images/s",
            "value": ratio, "threshold": TARGET, "comparison": ">=", "met": ratio >= TARGET}


def build_record(settings: PrecisionSettings, found: dict[str, Precision], measurements: dict, load: dict) -> dict:
    key = policy_key(found)
    ratios = compute_ratios(measurements, key)
    return {
        "benchmark": "speed on a CPU: the precision policy against fp32 NCHW (KD step loop, book pair)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_description(torch.device("cpu")),
        "device_kind": "cpu",
        "cpu": cpu_facts(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "settings": asdict(settings),
        "variants": {k: {"precision": p.name, "dtype": str(p.dtype) if p.dtype else None,
                         "channels_last": p.channels_last} for k, p in found.items()},
        "policy_variant": key,
        "policy_precision": found[key].name,
        "measurements": measurements,
        "ratios": ratios,
        "targets": [verdict(ratios["over_fp32_nchw"][key])],
    }


def cpu_facts() -> dict:
    """The processor's name, whether it has native bf16, and torch's vector capability."""
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {"model": model, "native_bf16": cpu_has_native_bf16(), "logical_cores": os.cpu_count(),
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


# --- the figure and the printout -------------------------------------------------------------------
LABELS = {"fp32-nchw": "fp32, NCHW", "fp32-channels_last": "fp32, channels_last", "policy": "policy"}


def plot(record: dict, path) -> None:
    """Best-round images/s per variant (bars), every round (dots), the ratio over fp32 NCHW above each bar."""
    from matplotlib.figure import Figure

    m, ratios = record["measurements"], record["ratios"]["over_fp32_nchw"]
    names = list(m)
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    ticks = [LABELS[n] + (f"\n({record['variants'][n]['precision']})" if n == "policy" else "") for n in names]
    for i, name in enumerate(names):
        ax.bar(i, m[name]["images_per_s"], 0.6, color=f"C{i}")
        rounds = [r["images_per_s"] for r in m[name]["rounds"]]
        ax.plot([i] * len(rounds), rounds, "k.", ms=5)
        ax.annotate(f"{ratios[name]:.2f}×", (i, m[name]["images_per_s"]), ha="center", va="bottom",
                    xytext=(0, 4), textcoords="offset points")
    ax.set_xticks(range(len(names)), ticks)
    ax.set_ylabel("training images / s (best round; dots: every round)")
    s = record["settings"]
    ax.set_title(f"KD step, {s['teacher']} → {s['student']}, batch {s['batch']}, "
                 f"{record['torch_threads']} threads", fontsize=10)
    ax.margins(y=0.15)
    load = record["load_average"]
    fig.suptitle(f"{record['cpu']['model']} (native bf16: {record['cpu']['native_bf16']}), "
                 f"torch {record['versions']['torch']}; 1-min load average {load['before'][0]:.1f} before, "
                 f"{load['after'][0]:.1f} after", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def report(record: dict) -> str:
    m, r = record["measurements"], record["ratios"]
    lines = [f"device: {record['device']} ({record['cpu']['model']}, native bf16: {record['cpu']['native_bf16']})",
             f"load average before {record['load_average']['before']}, after {record['load_average']['after']}",
             "", "variant              precision       best img/s  / fp32 NCHW  median img/s  / fp32 NCHW  rounds"]
    for name, row in m.items():
        rounds = ", ".join(f"{x['images_per_s']:,.0f}" for x in row["rounds"])
        lines.append(f"{name:20s} {record['variants'][name]['precision']:15s} {row['images_per_s']:10,.0f}  "
                     f"{r['over_fp32_nchw'][name]:11.2f}  {row['median_images_per_s']:12,.0f}  "
                     f"{r['over_fp32_nchw_median'][name]:11.2f}  {rounds}")
    t = record["targets"][0]
    lines += ["", f"[{'met' if t['met'] else 'NOT met'}] {t['statement']}: {t['value']:.2f} >= {t['threshold']:g}"
              f" (per round: {', '.join(f'{x:.2f}' for x in r['policy_over_fp32_nchw_per_round'])})"]
    return "\n".join(lines)
