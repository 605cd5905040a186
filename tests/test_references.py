"""Citations: every key the book cites is in book/references.bib, the bib has no duplicate, one bibliography page.

The book cites with MyST roles, ``{cite}`key```, ``{cite:p}`a,b```, ``{cite:t}`key```, in the
Markdown pages of ``book/`` and in the notebooks' Markdown cells and Markdown outputs (a results
table that code writes is rendered as MyST too). A key missing from the bib is only a warning to
Sphinx for some roles and renders as a bare key, so it is checked here. Entries nobody cites are
allowed (chapters being rewritten will cite them); the bibliography page lists cited works only.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIB = ROOT / "book" / "references.bib"
#: ``{cite}`k```, ``{cite:p}`k1, k2```, ``{cite:ts}`k```: the role's keys are between the backticks.
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]*)`")
#: ``@type{key,`` at the start of a line: how BibTeX opens an entry (``@comment``/``@string`` are not entries).
ENTRY = re.compile(r"^@(?!comment|string|preamble)\w+\s*\{\s*([^,\s]+)\s*,", re.MULTILINE | re.IGNORECASE)


def _markdown_of_notebook(path: Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            parts.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            md = out.get("data", {}).get("text/markdown")
            if md is not None:
                parts.append(md if isinstance(md, str) else "".join(md))
    return "\n".join(parts)


def sources() -> dict[str, str]:
    """``{relative path: Markdown text}`` of every page the book renders (its .md pages and notebooks)."""
    pages = {p: p.read_text(encoding="utf-8") for p in sorted((ROOT / "book").glob("*.md"))}
    pages |= {p: _markdown_of_notebook(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    return {p.relative_to(ROOT).as_posix(): text for p, text in pages.items()}


def cited_keys(text: str) -> list[str]:
    return [key.strip() for group in CITE.findall(text) for key in group.split(",") if key.strip()]


def test_cite_pattern_reads_every_role_form():
    text = "A {cite}`hinton2015kd`, B {cite:p}`ji2021afd, guo2024sakd`, C {cite:t}`romero2015fitnets`."
    assert cited_keys(text) == ["hinton2015kd", "ji2021afd", "guo2024sakd", "romero2015fitnets"]


def test_bib_has_no_duplicate_key():
    keys = [k.lower() for k in ENTRY.findall(BIB.read_text(encoding="utf-8"))]  # BibTeX keys ignore case
    assert len(keys) > 10
    assert not [k for k, n in Counter(keys).items() if n > 1]


def test_bib_parses_with_the_parser_the_book_uses():
    """pybtex (under sphinxcontrib-bibtex) reads every entry the regex sees, and refuses duplicates."""
    database = pytest.importorskip("pybtex.database", reason="pybtex comes with the book extra (jupyter-book)")
    entries = database.parse_file(str(BIB)).entries
    assert {k.lower() for k in entries} == {k.lower() for k in ENTRY.findall(BIB.read_text(encoding="utf-8"))}


def test_every_cited_key_is_in_the_bib():
    known = {k.lower() for k in ENTRY.findall(BIB.read_text(encoding="utf-8"))}
    cited = {page: cited_keys(text) for page, text in sources().items()}
    assert sum(map(len, cited.values())) > 50  # the scan found the citations
    missing = {page: sorted({k for k in keys if k.lower() not in known}) for page, keys in cited.items()}
    assert not {page: keys for page, keys in missing.items() if keys}


def test_one_bibliography_on_its_own_page():
    """sphinxcontrib-bibtex allows one unfiltered bibliography; it is the References page, listed in the toc."""
    directive = re.compile(r"^(```|:::)\{bibliography\}", re.MULTILINE)
    pages = [page for page, text in sources().items() if directive.search(text)]
    assert pages == ["book/references.md"]
    assert "file: book/references" in (ROOT / "_toc.yml").read_text(encoding="utf-8")
