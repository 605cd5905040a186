"""What the book's grid compares: each entry a method with the options that make it, and its reference.

A comparison isolates a method's attention term only when the method and its reference carry the
same logit terms. AFD, SAKD, AFT-KD and SAM-KD add ``0.9·τ²·KL`` (logit KD) to their own term, so they
are compared with KD; AT and FitNets, which carry no logit term, are compared with vanilla, and
their "+KD" controls (``at_kd``, ``fitnets_kd``: the same logit term as the attention methods) with KD.
LAKD has no logit term: vanilla. KD itself is compared with vanilla.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdlib import KDLibError


@dataclass(frozen=True)
class Entry:
    label: str  # the display name in every table and figure
    method: str
    options: dict = field(default_factory=dict)
    reference: str | None = None  # the label of the entry it is compared with


BOOK_GRID = (
    Entry("vanilla", "vanilla"),
    Entry("KD", "kd", reference="vanilla"),
    Entry("FitNets", "fitnets", reference="vanilla"),
    Entry("FitNets+KD", "fitnets_kd", reference="KD"),
    Entry("AT", "at", reference="vanilla"),
    Entry("AT+KD", "at_kd", reference="KD"),
    Entry("AFD", "afd", reference="KD"),
    Entry("SAKD", "sakd", reference="KD"),
    Entry("AFT-KD", "aftkd", reference="KD"),
    Entry("SAM-KD", "sam_kd", reference="KD"),
    Entry("LAKD", "lakd", reference="vanilla"),
)


def entry(name: str) -> Entry:
    """The grid entry with this label (``"AT+KD"``) or, for a plain method, this registry name (``"at"``)."""
    for e in BOOK_GRID:
        if name in (e.label, e.label.lower()) or (name == e.method and not e.options):
            return e
    raise KDLibError(f"no grid entry {name!r}; entries are {', '.join(e.label for e in BOOK_GRID)}")


def comparisons() -> list[tuple[Entry, Entry]]:
    """``(entry, its reference)`` for every entry that has one, in grid order (10 for the book's grid)."""
    by_label = {e.label: e for e in BOOK_GRID}
    return [(e, by_label[e.reference]) for e in BOOK_GRID if e.reference is not None]


def entry_of(config: dict) -> Entry | None:
    """The grid entry a record's config belongs to (its method, and the entry's options at their values), or None.

    An ablation (another value of an option the entry does not name) belongs to no entry: it is not
    the grid's run.
    """
    from kdlib.distill import resolve_options

    method, options = config["method"], dict(config.get("method_options") or {})
    for e in BOOK_GRID:
        if e.method == method and resolve_options(method, options) == resolve_options(method, e.options):
            return e
    return None


def by_entry(records: list[dict], student: str | None = None) -> dict[str, list[dict]]:
    """Records grouped by grid entry label (teachers and ablations left out), in grid order."""
    groups: dict[str, list[dict]] = {e.label: [] for e in BOOK_GRID}
    for r in records:
        cfg = r["config"]
        if cfg.get("teacher") is None and cfg["method"] == "vanilla" and student and cfg["student"] != student:
            continue  # the teacher's own run is a vanilla run of another architecture
        e = entry_of(cfg)
        if e is not None and (student is None or cfg["student"] == student):
            groups[e.label].append(r)
    return {k: v for k, v in groups.items() if v}


def grid_comparisons(records: list[dict], *, key: str = "top1_last", student: str | None = None):
    """Every grid entry against its reference, paired by seed, Holm-adjusted as one table (:mod:`kdlib.stats`)."""
    from kdlib.stats import adjust, compare

    groups = by_entry(records, student)
    out = [compare(groups[e.label], groups[ref.label], key=key, label=f"{e.label} − {ref.label}")
           for e, ref in comparisons() if e.label in groups and ref.label in groups]
    return adjust(out)
