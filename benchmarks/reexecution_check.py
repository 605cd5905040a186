"""Do the book's verdicts survive a re-execution? (evidence issue, item 6)

A seed pins a run only on the same CPU with the same thread count; another machine perturbs the
floats, and training amplifies that into points of accuracy. The cheap stand-in for "another
machine" is another thread count: this script trains the grid again with ``--threads`` (default 1)
in a cache of its own, computes the verdicts of the book's one statistical rule on those runs
(``kdlib.grid.grid_comparisons``), and compares them with the verdicts of the committed records.

    python benchmarks/reexecution_check.py --profile book --threads 1
    python benchmarks/reexecution_check.py --profile book --seeds 5 6 7 8 9   # other seeds instead
    python benchmarks/reexecution_check.py --before OLD/results/book --after results/book  # two executions

The last form trains nothing: it compares the records of two executions of the book that were made
already (for instance the committed records of a version and those of a fresh ``make book`` made with
other threads), each folder holding the grid.

It writes ``results/reexecution_<profile>.json`` (both tables and which verdicts held); not inside
``results/<profile>/``, whose every JSON file is read as a run record.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from kdlib.bench import grid
from kdlib.grid import by_entry, grid_comparisons
from kdlib.profiles import get_profile
from kdlib.run_store import load_records, results_root, write_json_atomic
from kdlib.train import EngineOptions, run


def verdicts(comparisons) -> dict[str, dict]:
    return {c.label: {"mean": c.mean, "low": c.low, "high": c.high, "p_holm": c.p_holm, "n": c.n,
                      "verdict": c.verdict} for c in comparisons}


def held(before: dict[str, dict], after: dict[str, dict]) -> dict[str, bool]:
    """A verdict holds when the word is the same ("not resolved with n seeds" counts as one word)."""
    word = lambda v: v["verdict"].split(" with ")[0]  # noqa: E731
    return {k: word(before[k]) == word(after[k]) for k in before if k in after}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="book")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--methods", nargs="+", help="grid entries (default: the whole grid)")
    ap.add_argument("--cache", help="cache for the re-run (default: a new temporary folder)")
    ap.add_argument("--before", help="records to compare with (default: results/<profile>)")
    ap.add_argument("--after", help="records of a re-execution made already: compare, train nothing")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    prof = get_profile(args.profile)
    folder = results_root() / prof.name
    committed = load_records(Path(args.before) if args.before else folder)
    if args.after:
        rerun = load_records(Path(args.after))
    else:
        torch.set_num_threads(args.threads)
        cache = Path(args.cache or tempfile.mkdtemp(prefix="kdlib-reexec-"))
        options = EngineOptions(progress=bool(os.environ.get("KDLIB_PROGRESS")))
        rerun = [run(cfg, options=options, root=cache) for cfg in grid(prof.name, args.methods, args.seeds)]
    before = verdicts(grid_comparisons(committed, student=prof.student))
    after = verdicts(grid_comparisons(rerun, student=prof.student))

    def devices(recs):  # of the grid's runs only: a folder may hold ablations of another execution
        return sorted({r.get("device", "?") for rs in by_entry(recs, student=prof.student).values() for r in rs})

    result = {"profile": prof.name, "seeds": args.seeds or list(prof.seeds),
              "devices": {"committed": devices(committed), "rerun": devices(rerun)},
              "committed": before, "rerun": after, "held": held(before, after)}
    write_json_atomic(Path(args.out) if args.out else results_root() / f"reexecution_{prof.name}.json", result)
    for label, ok in result["held"].items():
        print(f"{'held' if ok else 'CHANGED':8s} {label}: {before[label]['verdict']} -> {after[label]['verdict']}")
    return result


if __name__ == "__main__":
    json.dumps(main())
