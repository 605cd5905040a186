"""The book's one statistical rule: paired differences by seed, t intervals, Holm, the detectable effect.

Every verdict the book states about two methods comes from here, so that each chapter judges a
difference the same way. A seed fixes the student's initialisation and the data order in every
method, so a method and its reference are compared seed by seed:

- the **paired differences** d_i = method_i − reference_i over the seeds both completed;
- their mean, standard deviation s, the **t interval** mean ± t_{1−α/2, n−1}·s/√n and the
  **paired t-test**'s p value (``scipy.stats.ttest_rel``);
- **Holm's correction** across the comparisons of one table (``holm``, ``adjust``);
- the **verdict**, in three words defined once (``AHEAD``, ``BEHIND``, ``NOT_RESOLVED``);
- the **minimum detectable effect**: the smallest true difference the seeds at hand would detect
  with 80 % power (``min_detectable_effect``);
- the **Pearson correlation** of the two methods' per-seed results: pairing narrows the interval
  only when it is positive, since var(d) = s_m² + s_r² − 2·r·s_m·s_r.

Single-seed ablation options are not compared with a test; ``against_seed_range`` places them in the
default's seed range and labels them exploratory. book/how_built.md states the rule in prose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize, stats

from kdlib import KDLibError
from kdlib.results import is_complete, markdown_table

ALPHA = 0.05  # family-wise error rate of one table, after Holm's correction
POWER = 0.80  # the power at which the minimum detectable effect is quoted
AHEAD = "ahead"
BEHIND = "behind"
NOT_RESOLVED = "not resolved with {n} seeds"
EXPLORATORY = "exploratory (1 seed)"

# Accuracies are percentages of a finite test set, so two "equal" differences can come out a few ulps
# apart (95.3 − 94.3 ≠ 92.1 − 91.1 in floats). A spread below this, relative to the mean, is zero.
_ZERO_SPREAD = 1e-9


@dataclass(frozen=True)
class Pairs:
    """The per-seed values of a method and its reference over the seeds both completed."""

    seeds: tuple[int, ...]
    method: tuple[float, ...]
    reference: tuple[float, ...]

    @property
    def differences(self) -> tuple[float, ...]:
        return tuple(m - r for m, r in zip(self.method, self.reference))

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class Comparison:
    """One method against its reference, paired by seed. ``mean``, ``low``, ``high``, ``mde`` are in
    the units of ``key`` (accuracy points); ``p_holm`` is ``p`` until ``adjust`` sets it for a table."""

    label: str
    key: str
    seeds: tuple[int, ...]
    n: int
    mean: float
    sd: float
    low: float
    high: float
    confidence: float
    p: float
    p_holm: float
    family: int  # how many comparisons p_holm was adjusted over
    r: float
    mde: float
    verdict: str


@dataclass(frozen=True)
class SeedRange:
    """Where a single-seed value lies against the reference's seed range (min–max)."""

    value: float
    low: float
    high: float
    n: int  # seeds in the reference's range
    position: str  # "below", "inside" or "above"
    label: str = EXPLORATORY

    @property
    def inside(self) -> bool:
        return self.position == "inside"

    @property
    def text(self) -> str:
        return (f"{self.value:.2f}: {self.position} the default's seed range {self.low:.2f}–{self.high:.2f} "
                f"({self.n} seeds); {self.label}")


# --- pairing ----------------------------------------------------------------------------------
def _by_seed(records: list[dict], key: str, side: str) -> dict[int, float]:
    """Complete records by seed; diverged or unfinished ones have no value and are left out."""
    out: dict[int, float] = {}
    for rec in records:
        if "seed" not in rec:
            raise KDLibError(f"{side} record {rec.get('name', '?')} has no seed field")
        if rec["seed"] in out:
            raise KDLibError(f"{side} records hold seed {rec['seed']} twice: pass one method's runs per side")
        if not is_complete(rec) or rec.get(key) is None:
            continue
        value = float(rec[key])
        if math.isfinite(value):
            out[rec["seed"]] = value
    return out


def paired_differences(method_records: list[dict], reference_records: list[dict], key: str = "top1_last") -> Pairs:
    """Pair the two sides by seed: only seeds present on both sides with a complete record count."""
    method = _by_seed(method_records, key, "method")
    reference = _by_seed(reference_records, key, "reference")
    seeds = tuple(sorted(method.keys() & reference.keys()))
    if len(seeds) < 2:
        raise KDLibError(f"a paired comparison needs complete runs of at least 2 common seeds, got {len(seeds)} "
                         f"(method: {len(method)} complete, reference: {len(reference)} complete)")
    return Pairs(seeds, tuple(method[s] for s in seeds), tuple(reference[s] for s in seeds))


# --- the rule ---------------------------------------------------------------------------------
def verdict(*, p_holm: float, low: float, high: float, n: int, alpha: float = ALPHA) -> str:
    """``ahead`` / ``behind`` when the Holm-adjusted p is below α and the interval excludes 0 on that
    side; ``not resolved with n seeds`` otherwise (an undefined p included)."""
    if p_holm < alpha and low > 0:
        return AHEAD
    if p_holm < alpha and high < 0:
        return BEHIND
    return NOT_RESOLVED.format(n=n)


def _power(nc: float, df: int, t_crit: float) -> float:
    """P(|T| > t_crit) for T noncentral t with df degrees of freedom and noncentrality nc ≥ 0."""
    lower = float(stats.nct.cdf(-t_crit, df, nc))
    # scipy answers nan where this far tail underflows (below 1e-20 by λ ≈ 60 at df = 1): it is 0 there.
    return float(stats.nct.sf(t_crit, df, nc)) + (lower if math.isfinite(lower) else 0.0)


def power(effect: float, n: int, sd: float, *, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level α to detect a true mean difference ``effect``."""
    if n < 2:
        raise KDLibError(f"power needs at least 2 pairs, got {n}")
    df = n - 1
    # Two-sided, so symmetric in the sign of the effect; _power takes λ ≥ 0.
    return _power(abs(effect) * math.sqrt(n) / sd, df, float(stats.t.ppf(1 - alpha / 2, df)))


def min_detectable_effect(n: int, sd: float, *, alpha: float = ALPHA, target: float = POWER) -> float:
    """The smallest true mean difference the paired t-test detects with power ``target`` (two-sided, level α).

    Under a true difference δ the statistic t = mean/(s/√n) follows a noncentral t with n − 1 degrees
    of freedom and noncentrality λ = δ√n/σ; the test rejects when |t| > t_{1−α/2, n−1}. The MDE is
    δ* = λ*·s/√n, where λ* solves P(|T_{n−1,λ}| > t_{1−α/2, n−1}) = target, with the observed s for σ.
    For large n it tends to (z_{1−α/2} + z_{target})·s/√n = 2.80·s/√n; with few seeds it is far larger.
    """
    if n < 2:
        raise KDLibError(f"the minimum detectable effect needs at least 2 pairs, got {n}")
    if not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df = n - 1
    t_crit = float(stats.t.ppf(1 - alpha / 2, df))
    hi = t_crit + 4.0
    while _power(hi, df, t_crit) < target:  # heavy tails at df = 1 need λ of several tens
        hi *= 2
    nc = optimize.brentq(lambda lam: _power(lam, df, t_crit) - target, 0.0, hi, xtol=1e-10)
    return nc * sd / math.sqrt(n)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of the per-seed results; nan when undefined (a constant side) or trivial (2 points)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.pearsonr(a, b).statistic)


def compare(method_records: list[dict], reference_records: list[dict], *, key: str = "top1_last",
            confidence: float = 0.95, label: str = "") -> Comparison:
    """The paired comparison of a method with its reference, and its verdict as a family of one.

    Differences whose spread is zero (every seed moved by the same amount) leave the t-test undefined:
    p is nan and the verdict is "not resolved", however large the shift.
    """
    if not 0 < confidence < 1:
        raise KDLibError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    pairs = paired_differences(method_records, reference_records, key)
    m, ref = np.array(pairs.method), np.array(pairs.reference)
    d = m - ref
    n, mean, sd = pairs.n, float(d.mean()), float(d.std(ddof=1))
    if sd <= _ZERO_SPREAD * max(1.0, abs(mean)):
        sd, p, low, high = 0.0, math.nan, mean, mean
    else:
        test = stats.ttest_rel(m, ref)
        ci = test.confidence_interval(confidence)
        p, low, high = float(test.pvalue), float(ci.low), float(ci.high)
    return Comparison(
        label=label, key=key, seeds=pairs.seeds, n=n, mean=mean, sd=sd, low=low, high=high,
        confidence=confidence, p=p, p_holm=p, family=1, r=_correlation(m, ref),
        mde=min_detectable_effect(n, sd) if sd > 0 else math.nan,  # at the verdict's α, whatever the interval's level
        verdict=verdict(p_holm=p, low=low, high=high, n=n),
    )


# --- one table: Holm's correction -------------------------------------------------------------
def holm(comparisons: list) -> list[float]:
    """Holm-adjusted p values, in the input's order (Comparisons or plain p values).

    Sort the m p values ascending, multiply the i-th (from 0) by m − i, take the running maximum and
    clip at 1. An undefined p (nan) counts in m and is adjusted to 1.
    """
    p = np.array([c.p if isinstance(c, Comparison) else c for c in comparisons], dtype=float)
    p = np.where(np.isnan(p), 1.0, p)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def adjust(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons of one table with Holm-adjusted p values and the verdicts that follow from them."""
    return [
        replace(c, p_holm=ph, family=len(comparisons), verdict=verdict(p_holm=ph, low=c.low, high=c.high, n=c.n))
        for c, ph in zip(comparisons, holm(comparisons))
    ]


def table(comparisons: list[Comparison]) -> list[dict]:
    """One row per comparison, Holm-adjusted across them: the numbers, not formatted."""
    return [
        {"label": c.label, "key": c.key, "n": c.n, "delta": c.mean, "low": c.low, "high": c.high,
         "confidence": c.confidence, "p": c.p, "p_holm": c.p_holm, "r": c.r, "mde": c.mde, "verdict": c.verdict}
        for c in adjust(comparisons)
    ]


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fmt(x: float, fmt: str) -> str:
    return "n/a" if math.isnan(x) else format(x, fmt)


def markdown(comparisons: list[Comparison], digits: int = 2, unit: str = "points") -> str:
    """The Markdown table of one family of comparisons: Δ, interval, p, Holm p, r, MDE, verdict.

    ``unit`` names the units of Δ (accuracy points by default; a metric's name for other keys).
    """
    rows = table(comparisons)
    level = f"{100 * rows[0]['confidence']:g} %" if rows else "95 %"
    f = f".{digits}f"
    cells = [
        {"label": r["label"], "n": str(r["n"]), "delta": format(r["delta"], "+" + f),
         "ci": f"[{r['low']:{'+' + f}}, {r['high']:{'+' + f}}]", "p": _fmt_p(r["p"]), "p_holm": _fmt_p(r["p_holm"]),
         "r": _fmt(r["r"], "+.2f"), "mde": _fmt(r["mde"], f), "verdict": r["verdict"]}
        for r in rows
    ]
    columns = [("label", "comparison"), ("n", "seeds"), ("delta", f"Δ ({unit})"), ("ci", f"{level} interval"),
               ("p", "p"), ("p_holm", "Holm p"), ("r", "r"), ("mde", "MDE (80 % power)"), ("verdict", "verdict")]
    return markdown_table(cells, columns)


def compare_values(method: dict[int, float], reference: dict[int, float], *, label: str = "",
                   confidence: float = 0.95) -> Comparison:
    """:func:`compare` for per-seed values that are not accuracies of records (a metric computed from
    each seed's model): ``{seed: value}`` on each side, paired by seed."""
    def records(values: dict[int, float]) -> list[dict]:
        return [{"seed": int(s), "status": "complete", "value": float(v)} for s, v in values.items()]

    return compare(records(method), records(reference), key="value", label=label, confidence=confidence)


# --- single-seed options ----------------------------------------------------------------------
def against_seed_range(value, reference_records: list[dict], *, key: str = "top1_last") -> SeedRange:
    """Place one seed's result (a number or a complete record) in the reference's seed range (min–max)."""
    if isinstance(value, dict):
        if not is_complete(value) or value.get(key) is None:
            raise KDLibError(f"record {value.get('name', '?')} did not complete: it has no {key} to place")
        value = value[key]
    value = float(value)
    ref = list(_by_seed(reference_records, key, "reference").values())
    if len(ref) < 2:
        raise KDLibError(f"a seed range needs complete reference runs of at least 2 seeds, got {len(ref)}")
    low, high = min(ref), max(ref)
    position = "below" if value < low else "above" if value > high else "inside"
    return SeedRange(value=value, low=low, high=high, n=len(ref), position=position)
