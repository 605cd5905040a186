"""Run records, the run cache keyed by config hash, and summary tables.

Results are data: every number the book shows comes from a JSON record written by the engine,
holding the resolved config, seed, versions, device, per-epoch curves, last- and best-epoch
accuracy, wall time and peak memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
from pathlib import Path

import torch

import kdlib
from kdlib import KDLibError
from kdlib.config import RunConfig

REPO_RESULTS = Path(__file__).resolve().parent.parent / "results"


def config_hash(cfg: RunConfig) -> str:
    """Stable 16-hex-digit hash of a run config (the teacher's config included)."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_name(cfg: RunConfig) -> str:
    """Human-readable, unique folder name: ``<method>-<student>[-from-<teacher>]-s<seed>-<hash>``."""
    parts = [cfg.method, cfg.student]
    if cfg.teacher is not None:
        parts.append(f"from-{cfg.teacher.student}")
    parts += [f"s{cfg.seed}", config_hash(cfg)]
    return "-".join(parts)


def cache_root() -> Path:
    """``$KDLIB_CACHE`` or ``~/.cache/kdlib``."""
    root = os.environ.get("KDLIB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kdlib"


def run_dir(cfg: RunConfig, root: Path | None = None) -> Path:
    return (root or cache_root()) / "runs" / run_name(cfg)


def versions() -> dict[str, str]:
    import torchvision

    return {
        "kdlib": kdlib.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary file, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def load_record(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KDLibError(f"cannot read run record {path}: {e}") from None


def find_record(cfg: RunConfig, root: Path | None = None, status: str = "complete") -> dict | None:
    """The record of this exact config in the cache with the given status, or None.

    ``status`` is ``complete`` (a finished run) or ``diverged`` (a run stopped by a NaN/inf loss).
    """
    path = run_dir(cfg, root) / "record.json"
    if path.exists():
        rec = load_record(path)
        if rec.get("status") == status and rec.get("hash") == config_hash(cfg):
            return rec
    return None


def is_complete(record: dict) -> bool:
    return record.get("status", "complete") == "complete"


def outcome(values: list[float], records: list[dict]) -> str:
    """``mean ± std`` of the complete runs, with the diverged ones counted beside it."""
    diverged = sum(not is_complete(r) for r in records)
    if diverged == len(records):
        epochs = sorted({int(r.get("diverged_epoch") or 0) for r in records})  # 0: not recorded
        return "diverged (epoch " + ", ".join(str(e) if e else "?" for e in epochs) + ")"
    text = fmt_mean_std(values)
    return f"{text} ({diverged} diverged)" if diverged else text


def export_record(record: dict, folder: Path) -> Path:
    """Copy a record into a results folder (committed to the repository)."""
    path = Path(folder) / f"{record['name']}.json"
    write_json_atomic(path, record)
    return path


def load_records(folder: Path | str) -> list[dict]:
    folder = Path(folder)
    return [load_record(p) for p in sorted(folder.glob("*.json")) if not p.name.startswith("summary")]


# --- summaries --------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def method_label(cfg: dict) -> str:
    """``sakd`` for default options, ``sakd (p=0.3, taps='stages')`` otherwise."""
    options = cfg.get("method_options") or {}
    if not options:
        return cfg["method"]
    return f"{cfg['method']} (" + ", ".join(f"{k}={v!r}" for k, v in sorted(options.items())) + ")"


def summarise(records: list[dict]) -> list[dict]:
    """One row per (method with its options, student, teacher): n seeds, last/best top-1, time, memory.

    Runs that differ only in seed are pooled; an ablation (other options) gets its own row.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        cfg = r["config"]
        key = (method_label(cfg), cfg["student"], (cfg.get("teacher") or {}).get("student"))
        groups.setdefault(key, []).append(r)
    rows = []
    for (method, student, teacher), recs in groups.items():
        done = [r for r in recs if is_complete(r)]  # diverged runs have no accuracy, only their error
        last = [r["top1_last"] for r in done]
        best = [r["top1_best"] for r in done]
        epoch_time = [r["wall_time_s"] / max(1, len(r["history"])) for r in recs if r["history"]]
        mem = [r["peak_memory"]["bytes"] for r in done if (r.get("peak_memory") or {}).get("bytes")]
        rows.append(
            {
                "method": method,
                "teacher": teacher or "-",
                "student": student,
                "seeds": len(recs),
                "diverged": len(recs) - len(done),
                "top1_last": mean_std(last),
                "top1_best": mean_std(best),
                "top1_last_str": outcome(last, recs),
                "top1_best_str": outcome(best, recs),
                "epoch_time_s": statistics.fmean(epoch_time) if epoch_time else math.nan,
                "peak_mem_mb": (statistics.fmean(mem) / 2**20) if mem else math.nan,
                "records": [r["name"] for r in recs],
            }
        )
    return rows


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Render rows as a Markdown table; ``columns`` = [(key, header)]."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            v = row.get(key, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


SUMMARY_COLUMNS = [
    ("method", "method"),
    ("teacher", "teacher"),
    ("student", "student"),
    ("seeds", "seeds"),
    ("top1_last_str", "top-1 last (%)"),
    ("top1_best_str", "top-1 best (%)"),
    ("epoch_time_s", "s / epoch"),
    ("peak_mem_mb", "peak MB"),
]
