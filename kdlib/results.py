"""Summaries of run records: mean ± std, outcome strings, the summary table.

Records themselves (identity, folders, atomic writes, checkpoints) live in :mod:`kdlib.run_store`.
"""

from __future__ import annotations

import math
import statistics

# The chapters' imports (kdlib.results.run_dir, REPO_RESULTS, ...) as stored in the committed
# notebooks: the run store's names, re-exported.
from kdlib.run_store import (  # noqa: F401
    device_description,
    load_record,
    load_records,
    results_root,
    run_dir,
    write_json_atomic,
)


def __getattr__(name: str):
    # REPO_RESULTS is computed when asked for: $KDLIB_RESULTS may be set after import.
    if name == "REPO_RESULTS":
        return results_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """``sakd`` for default options, ``sakd (p=0.3, taps='stages')`` otherwise.

    Records hold every option resolved; the label names those that differ from today's defaults.
    """
    from kdlib.distill import resolve_options

    options = cfg.get("method_options") or {}
    defaults = resolve_options(cfg["method"])
    changed = {k: v for k, v in options.items() if k not in defaults or defaults[k] != v}
    if not changed:
        return cfg["method"]
    return f"{cfg['method']} (" + ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())) + ")"


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
