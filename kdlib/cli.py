"""Command line: ``kdlib train | bench | report`` (``python -m kdlib`` works too).

Every error kdlib raises on purpose (unknown or ill-typed option, unknown model or method,
incompatible pair, epochs < 1, unavailable device, corrupt or mismatched checkpoint, missing
dataset, NaN loss) and every malformed argument is printed as one line on stderr, exit code 2,
before any training starts where it can be known then.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

from kdlib import KDLibError


def _parse_option(text: str) -> tuple[str, object]:
    """``key=value`` with a Python literal value (``p=0.3``, ``taps='stages'``, ``truncate=False``)."""
    if "=" not in text:
        raise KDLibError(f"method option {text!r} must look like key=value")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word is a string


def _config_from_args(args):
    from kdlib.profiles import get_profile

    profile = get_profile(args.profile)
    options = dict(_parse_option(o) for o in args.option or [])
    cfg = profile.config(args.method, student=args.student, teacher=args.teacher, seed=args.seed, **options)
    if args.dataset and args.dataset != cfg.data.name:
        data = dataclasses.replace(cfg.data, name=args.dataset)
        cfg = cfg.replace(data=data, teacher=cfg.teacher.replace(data=data) if cfg.teacher else None)
    if args.epochs is not None:  # 0 and negative counts are refused by the engine's validation, not ignored
        cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, epochs=args.epochs))
    if args.data_root or args.download:
        data = dataclasses.replace(cfg.data, root=args.data_root or cfg.data.root, download=args.download)
        cfg = cfg.replace(data=data, teacher=cfg.teacher.replace(data=data) if cfg.teacher else None)
    return cfg


def cmd_train(args) -> int:
    from kdlib.run_store import export_record, results_root, run_dir
    from kdlib.train import EngineOptions, run, validate

    cfg = _config_from_args(args)
    options = EngineOptions(device=args.device, precision=args.precision, progress=not args.quiet)
    validate(cfg)  # everything that can be checked, before the teacher trains or a folder is made
    options.resolve_device()
    record = run(cfg, options=options)
    print(f"top-1 last {record['top1_last']:.2f} %, best {record['top1_best']:.2f} % (epoch {record['best_epoch']})")
    print(f"record: {run_dir(cfg) / 'record.json'}")
    if args.export:
        out = Path(args.export) if args.export != "results" else results_root() / cfg.profile
        print(f"exported: {export_record(record, out)}")
    return 0


def cmd_bench(args) -> int:
    from kdlib.bench import Launch, run_grid

    launch = Launch(executor=args.executor, jobs=args.jobs, partition=args.partition, gpus_per_run=args.gpus_per_run,
                    cpus_per_run=args.cpus_per_run, time_min=args.time, array_parallelism=args.array_parallelism,
                    log_dir=args.log_dir)
    run_grid(args.profile, methods=args.methods, seeds=args.seeds, out=args.out, device=args.device,
             progress=not args.quiet, launch=launch)
    return 0


def cmd_report(args) -> int:
    from kdlib.results import SUMMARY_COLUMNS, markdown_table, summarise
    from kdlib.run_store import load_records

    records = load_records(args.results)
    if not records:
        raise KDLibError(f"no run records in {args.results}")
    print(markdown_table(summarise(records), SUMMARY_COLUMNS))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with kdlib's error form: one line on stderr, exit code 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"kdlib: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one run (cached: a finished run is returned, an interrupted one resumed)")
    t.add_argument("--method", default="kd")
    t.add_argument("--student")
    t.add_argument("--teacher")
    t.add_argument("--dataset", help="shapes | cifar10 | cifar100 (default: the profile's)")
    t.add_argument("--profile", help="smoke | book | paper (default: $KDLIB_PROFILE or book)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, help="override the profile's epoch count")
    t.add_argument("--option", "-o", action="append", help="method option key=value (repeatable)")
    t.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="arithmetic (default: $KDLIB_PRECISION or auto, see kdlib.precision)")
    t.add_argument("--data-root", help="dataset folder (CIFAR)")
    t.add_argument("--download", action="store_true", help="download CIFAR if missing")
    t.add_argument("--export", nargs="?", const="results", help="copy the record into results/<profile>/ or DIR")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="run a grid of methods × seeds on a profile's pair(s), write results/",
                       description="Run a grid; failed runs are listed at the end (exit code 2), the others kept.")
    b.add_argument("--profile")
    b.add_argument("--methods", nargs="+", help="grid entries (e.g. KD \"AT+KD\" sakd; default: the whole book grid)")
    b.add_argument("--seeds", nargs="+", type=int)
    b.add_argument("--out", help="results folder (default results/<profile>)")
    b.add_argument("--device")
    b.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    b.add_argument("--executor", choices=("local", "slurm", "inline"), default="local",
                   help="local: concurrent processes on this machine (default); slurm: one job array; "
                        "inline: one run after another in this process (local and slurm need kdlib[cluster])")
    b.add_argument("--jobs", type=int,
                   help="local: runs at once (default: one per GPU; on a CPU one per core, one thread each)")
    b.add_argument("--partition", help="slurm: the partition")
    b.add_argument("--gpus-per-run", type=int, help="slurm: GPUs of each array task (default 1)")
    b.add_argument("--cpus-per-run", type=int, help="slurm: CPUs of each array task (default: the partition's)")
    b.add_argument("--time", type=int, metavar="MIN",
                   help="wall-time limit of each run in minutes (slurm default 1440; a run that reaches it "
                        "is requeued and resumes from its checkpoint)")
    b.add_argument("--array-parallelism", type=int, help="slurm: array tasks running at once (default: all)")
    b.add_argument("--log-dir", help="submitit's folder for job logs (default <cache>/jobs; on Slurm a shared disk)")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="print the summary table of a results folder")
    r.add_argument("results", nargs="?", default="results/book")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KDLibError as e:
        print(f"kdlib: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdlib: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
