"""Every verdict in the book comes from one statistical rule, ``kdlib.stats``: no chapter computes its own.

The chapters used to judge by their own rules (√(s²+s²), max(s_a, s_b), 2·SE, same sign and |m| > s).
The check reads every code cell of every chapter and refuses the constructions such a rule is made of:
a test statistic or its distribution (``ttest_*``, ``.ppf``/``.cdf``/``.sf``, ``t.interval``), a
multiple-comparison correction, a hard-coded critical value, a standard-error interval, or a verdict
word decided in the notebook. Descriptive statistics (a mean, a standard deviation shown as spread, a
rank correlation between two metrics) are not verdicts and stay allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

OWN_RULE = {
    "a test statistic": re.compile(r"\bttest_\w*\(|\bwilcoxon\(|\bmannwhitneyu\(|\bt\.interval\("),
    "a distribution's quantile or tail": re.compile(r"\.(ppf|cdf|sf|isf)\("),
    "a multiple-comparison correction": re.compile(r"\bmultipletests\(|\bbonferroni\b|holm\s*\(", re.I),
    "a hard-coded critical value": re.compile(r"(?<![\d.])(1\.96|2\.776|4\.303|2\.571)(?![\d])"),
    "a standard-error interval": re.compile(r"\b[12](\.0)?\s*\*\s*(se|sem|stderr)\b|\bsem\(", re.I),
    "a verdict decided in the notebook": re.compile(
        r"""["'](ahead|behind|worked|not resolved[^"']*)["']\s+if\b|=\s*["'](ahead|behind|worked)["']"""),
}


def own_rule_lines(source: str) -> list[str]:
    """The lines of a code cell that compute a statistical rule of their own, with what each one is."""
    found = []
    for line in source.splitlines():
        code = line.split("#", 1)[0]  # a comment may name a rule; only code computes one
        for what, pattern in OWN_RULE.items():
            if pattern.search(code):
                found.append(f"{what}: {line.strip()}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_chapter_computes_its_own_rule(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = [f"cell {i}: {hit}" for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
             for hit in own_rule_lines("".join(cell["source"]))]
    assert found == [], f"{path.name} computes a rule of its own instead of kdlib.stats:\n" + "\n".join(found)


def test_the_chapters_use_the_library_rule():
    """Each chapter that states a verdict reaches kdlib.stats (or kdlib.grid's comparisons on top of it)."""
    users = [p.name for p in NOTEBOOKS if re.search(r"kdlib\.stats|from kdlib import .*\bstats\b|grid_comparisons",
                                                     p.read_text(encoding="utf-8"))]
    assert set(users) >= {"01_baselines.ipynb", "10_sakd.ipynb", "11_aftkd.ipynb", "12_spatial_attention.ipynb",
                          "13_lakd.ipynb", "20_comparison.ipynb"}, users


@pytest.mark.parametrize("line", [
    "p = scipy.stats.ttest_rel(a, b).pvalue",
    "half = scipy.stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)",
    "lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=m, scale=se)",
    "reject = multipletests(ps, method='holm')[0]",
    "ok = abs(m) > 1.96 * s / math.sqrt(n)",
    "band = m - 2 * se",
    "label = 'worked' if m > s else 'no effect'",
    "if m > 0 and abs(m) > sd: verdict = 'ahead'",
])
def test_the_check_finds_an_own_rule(line):
    assert own_rule_lines(line), line


@pytest.mark.parametrize("line", [
    "c = kdlib.stats.compare(sakd, kd, label='SAKD − KD')",
    "text = f'{c.verdict}: Δ {c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}], Holm p {c.p_holm:.3f}'",
    "spread = float(np.std(values, ddof=1))",
    "rho = scipy.stats.spearmanr(x, y).statistic",
    "ahead = [c.label for c in comparisons if c.verdict == kdlib.stats.AHEAD]",
    "# Holm's correction over all of them (a comment names the rule)",
])
def test_the_check_allows_the_library_and_descriptive_statistics(line):
    assert own_rule_lines(line) == [], line
