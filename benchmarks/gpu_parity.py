"""Do the book's runs on a GPU land where the committed CPU runs of the same seeds land?

After ``gpu_check.sh`` has executed a book-profile chapter on the device, its exported records (device
``cuda: ...``) are compared with the committed CPU records in ``results/book`` of the same configs and
seeds. A seed fixes the initialisation and the data order on any device, but not the floats: a GPU
(and bf16 autocast there) perturbs the arithmetic as another seed would, and training amplifies it
(issue 19: a fresh CPU re-run moved results by sd 1.3 points). So the question is whether the device
difference stays within the seed spread, not whether it is zero:

    |mean_gpu − mean_cpu| ≤ 2 · s_cpu      (s_cpu: the CPU records' standard deviation over the seeds)

Per seed, the paired difference is reported too, with a paired t-test (``scipy.stats.ttest_rel``) as
information: with three seeds it detects only large shifts. The verdict that decides the exit status is
the one of ``--method`` (default KD); every other config the chapter trained is reported beside it.

    python benchmarks/gpu_parity.py --gpu DIR [--cpu results/book] [--out parity.json] [--tar records.tar.gz]
    python benchmarks/gpu_parity.py --dry-run            # checks the CPU side only (no GPU needed)

Exit status: 0 within the spread, 1 outside it, 2 nothing to compare (a one-line error).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from pathlib import Path

import torch

from kdlib import KDLibError
from kdlib.distill import resolve_options
from kdlib.precision import resolve_precision
from kdlib.results import method_label
from kdlib.run_store import load_records, results_root, write_json_atomic

SPREADS = 2.0  # the rule: |Δ mean| within this many CPU seed standard deviations


def on(device_prefix: str, records: list[dict]) -> list[dict]:
    """The complete records of runs made on ``cpu`` or ``cuda``."""
    return [r for r in records if str(r.get("device", "")).startswith(device_prefix)
            and r.get("status", "complete") == "complete" and r.get("top1_last") is not None]


def default_options(config: dict) -> bool:
    """Whether a record ran its method with the default options (records store every option resolved)."""
    options = config.get("method_options") or {}
    return resolve_options(config["method"], options) == resolve_options(config["method"], {})


def config_key(config: dict) -> str:
    """A run's config without its seed: the runs that differ only by seed share it."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True, default=str)


def label(config: dict) -> str:
    teacher = config.get("teacher")
    pair = f"{teacher['student']} → {config['student']}" if teacher else config["student"]
    return f"{method_label(config)} ({pair})"


def compare_group(cpu: list[dict], gpu: list[dict]) -> dict:
    """The GPU runs of one config against the CPU runs of the same config, paired by seed."""
    from scipy import stats

    cpu_by_seed = {r["seed"]: r["top1_last"] for r in cpu}
    gpu_by_seed = {r["seed"]: r["top1_last"] for r in gpu}
    seeds = sorted(set(cpu_by_seed) & set(gpu_by_seed))
    c, g = [cpu_by_seed[s] for s in seeds], [gpu_by_seed[s] for s in seeds]
    row = {"seeds": seeds, "cpu_top1_last": c, "gpu_top1_last": g,
           "paired_difference": [b - a for a, b in zip(c, g)],
           "gpu_precision": sorted({r.get("precision", "?") for r in gpu if r["seed"] in seeds}),
           "gpu_wall_time_s": [next(r["wall_time_s"] for r in gpu if r["seed"] == s) for s in seeds],
           "cpu_wall_time_s": [next(r["wall_time_s"] for r in cpu if r["seed"] == s) for s in seeds]}
    if not seeds:
        return {**row, "within_spread": None, "note": "no seed in common"}
    row["cpu_mean"], row["gpu_mean"] = statistics.fmean(c), statistics.fmean(g)
    row["difference_of_means"] = row["gpu_mean"] - row["cpu_mean"]
    if len(seeds) < 2:
        return {**row, "within_spread": None, "note": "one seed: no spread to compare with"}
    row["cpu_std"], row["gpu_std"] = statistics.stdev(c), statistics.stdev(g)
    row["allowed"] = SPREADS * row["cpu_std"]
    row["within_spread"] = abs(row["difference_of_means"]) <= row["allowed"]
    test = stats.ttest_rel(g, c)
    row["paired_t_pvalue"] = None if test.pvalue != test.pvalue else float(test.pvalue)  # NaN: no variation
    return row


def compare(cpu_records: list[dict], gpu_records: list[dict]) -> dict[str, dict]:
    """Every config the GPU ran, against the CPU runs of the same config (keyed by its label)."""
    cpu, gpu = on("cpu", cpu_records), on("cuda", gpu_records)
    if not gpu:
        raise KDLibError("no complete GPU record (device 'cuda: ...') to compare")
    groups: dict[str, list[dict]] = {}
    for r in gpu:
        groups.setdefault(config_key(r["config"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        same = [r for r in cpu if config_key(r["config"]) == key]
        config = runs[0]["config"]
        out[label(config)] = {"method": config["method"], "options": config.get("method_options") or {},
                              "default_options": default_options(config), **compare_group(same, runs)}
    return out


def headline(rows: dict[str, dict], method: str) -> tuple[str, dict]:
    """The row of ``method`` with default options (the one the verdict is on)."""
    for name, row in rows.items():
        if row["method"] == method and row["default_options"] and row.get("seeds"):
            return name, row
    raise KDLibError(f"no GPU run of {method!r} with a CPU record of the same config and seed")


def policy_text() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device here"
    p = resolve_precision("cuda")
    return f"{p.name} (channels_last {p.channels_last}) on {torch.cuda.get_device_name()}"


def report(rows: dict[str, dict], name: str) -> str:
    lines = [f"{'run':42s} {'seeds':8s} {'CPU mean ± sd':>15s} {'GPU mean ± sd':>15s} {'Δ':>7s} "
             f"{'allowed':>8s}  verdict"]
    for key, r in rows.items():
        if "cpu_mean" not in r:
            lines.append(f"{key:42s} {r.get('note', '')}")
            continue
        cpu = f"{r['cpu_mean']:.2f} ± {r.get('cpu_std', 0):.2f}"
        gpu = f"{r['gpu_mean']:.2f} ± {r.get('gpu_std', 0):.2f}"
        verdict = {True: "within", False: "OUTSIDE", None: r.get("note", "")}[r["within_spread"]]
        allowed = f"{r['allowed']:.2f}" if "allowed" in r else "–"
        mark = " <- the check" if key == name else ""
        lines.append(f"{key:42s} {','.join(map(str, r['seeds'])):8s} {cpu:>15s} {gpu:>15s} "
                     f"{r['difference_of_means']:+7.2f} {allowed:>8s}  {verdict}{mark}")
    return "\n".join(lines)


def dry_run(cpu_folder: Path, method: str) -> str:
    """The CPU side alone: complete records of ``method`` (default options) on at least two seeds."""
    runs = [r for r in on("cpu", load_records(cpu_folder)) if r["config"]["method"] == method
            and default_options(r["config"])]
    if len({r["seed"] for r in runs}) < 2:
        raise KDLibError(f"{cpu_folder} holds {len(runs)} CPU record(s) of {method!r}: the parity check needs "
                         "at least two seeds")
    return f"CPU reference: {method} on seeds {sorted(r['seed'] for r in runs)} in {cpu_folder}"


def write_tar(records: list[dict], gpu_folder: Path, path: Path) -> int:
    """The GPU records of ``gpu_folder`` in one .tar.gz (the device returns at most 8 files)."""
    names = {r["name"] for r in on("cuda", records)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(names):
            tar.add(gpu_folder / f"{name}.json", arcname=f"book_gpu/{name}.json")
    return len(names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", type=Path, default=results_root() / "book", help="CPU records (default results/book)")
    p.add_argument("--gpu", type=Path, help="folder with the GPU run's exported records")
    p.add_argument("--method", default="kd", help="the run whose parity decides the exit status (default kd)")
    p.add_argument("--out", type=Path, help="write the comparison as JSON here")
    p.add_argument("--tar", type=Path, help="write the GPU records as one .tar.gz here")
    p.add_argument("--dry-run", action="store_true", help="check the CPU records only")
    args = p.parse_args(argv)
    try:
        if args.dry_run:
            print(dry_run(args.cpu, args.method))
            return 0
        if args.gpu is None:
            raise KDLibError("--gpu DIR is needed (or --dry-run)")
        gpu_records = load_records(args.gpu)
        rows = compare(load_records(args.cpu), gpu_records)
        name, row = headline(rows, args.method)
    except KDLibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    policy = policy_text()
    print(f"precision policy here: {policy}; the GPU records say: {', '.join(row['gpu_precision'])}")
    print(report(rows, name))
    if args.tar:
        print(f"{write_tar(gpu_records, args.gpu, args.tar)} GPU record(s) in {args.tar}")
    if args.out:
        write_json_atomic(args.out, {"rule": f"|mean_gpu - mean_cpu| <= {SPREADS:g} * s_cpu (seeds paired)",
                                     "checked": name, "within_spread": row["within_spread"],
                                     "precision_policy": policy, "runs": rows})
    if row["within_spread"] is None:
        print(f"error: {name}: {row.get('note')}", file=sys.stderr)
        return 2
    return 0 if row["within_spread"] else 1


if __name__ == "__main__":
    sys.exit(main())
