"""Browser check of the built book (tests/browser_check.py), and proof that the check can fail.

Run after the build:  ``jupyter-book build . -W -n --keep-going && pytest tests/test_browser.py``.
Without ``_build/html`` the whole-book test is skipped at once; without Chromium every test that
needs a browser is skipped with the reason. The parsing and link tests need neither.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from browser_check import (
    check_links,
    check_rendered,
    check_site,
    default_screenshot_pages,
    find_chromium,
    format_report,
    parse_page,
    toc_pages,
)

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
NO_CHROMIUM = "chromium not installed: run make test as root or apt-get install chromium"


def chromium_or_skip() -> str:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(NO_CHROMIUM)
    return chromium


def tiny_png() -> bytes:
    """A valid 1×1 RGB PNG, written with the standard library only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # width, height, depth 8, RGB
    pixels = zlib.compress(b"\x00\x20\x80\xff")  # filter byte + one pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def page(title: str, body: str) -> str:
    head = '<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head>'
    return f'{head}<body id="top">\n<h1>{title}</h1>\n{body}\n</body></html>\n'


@pytest.fixture
def fake_site(tmp_path: Path) -> Path:
    """Three pages: ``index`` with one good and two bad images and links, ``other`` fine, ``untitled``."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(tiny_png())
    (tmp_path / "img" / "corrupt.png").write_bytes(b"this is not a png")
    (tmp_path / "index.html").write_text(
        page(
            'Fake <a class="headerlink" href="#top">#</a>',
            '<img src="img/ok.png" alt="fine"> <img src="img/missing.png" alt="absent">'
            ' <img src="img/corrupt.png" alt="undecodable">'
            ' <a href="other.html">fine</a> <a href="other.html#here">fine anchor</a>'
            ' <a href="#local">same page</a> <span id="local"></span>'
            ' <a href="nowhere.html">broken</a> <a href="other.html#nope">broken anchor</a>'
            ' <a href="https://example.org/x.html">external, not checked</a>',
        )
    )
    (tmp_path / "other.html").write_text(page("Other", '<p id="here">x</p> <a href="index.html">back</a>'))
    (tmp_path / "untitled.html").write_text(page('<a class="headerlink" href="#">#</a>', "<p>no title</p>"))
    return tmp_path


# --- parsing and links: no browser needed -----------------------------------------------------
def test_h1_text_ignores_the_permalink_sign():
    assert parse_page('<h1>Title <em>x</em><a class="headerlink" href="#t">#</a></h1>').h1_text == "Title x"
    assert parse_page('<h1><a class="headerlink" href="#t">#</a></h1>').h1_text == ""
    assert parse_page("<h1>A<img src='a.png'>B</h1><h1>second</h1>").h1_text == "AB"
    assert parse_page("<p>none</p>").h1_text is None


def test_toc_pages_lists_root_and_nested_files(tmp_path: Path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: book/intro\nparts:\n"
        "  - caption: A\n    chapters:\n      - file: book/a.md\n"
        "        sections:\n          - file: notebooks/b.ipynb\n"
        "  - caption: B\n    chapters:\n      - file: book/c\n      - url: https://example.org\n"
    )
    assert toc_pages(toc) == ["book/intro", "book/a", "notebooks/b", "book/c"]
    assert default_screenshot_pages(toc_pages(toc)) == ["notebooks/b", "book/intro"]


def test_screenshots_show_the_first_chapter_and_the_first_method_chapter():
    pages = ["book/intro", "book/notation", "notebooks/00_data", "notebooks/01_baselines", "notebooks/10_sakd",
             "notebooks/11_aftkd", "book/references"]
    assert default_screenshot_pages(pages) == ["notebooks/00_data", "notebooks/10_sakd"]
    assert default_screenshot_pages(pages[:4]) == ["notebooks/00_data", "notebooks/01_baselines"]
    assert default_screenshot_pages(["book/intro", "book/a", "book/b"]) == ["book/intro", "book/a"]


def test_link_check_reports_exactly_the_broken_link_and_anchor(fake_site: Path):
    assert check_links(fake_site, "index") == [
        "broken link 'nowhere.html': nowhere.html does not exist",
        "broken anchor 'other.html#nope': no id 'nope' in other.html",
    ]
    assert check_links(fake_site, "other") == []


def test_a_page_that_never_loaded_is_reported():
    assert check_rendered("<html><body><h1>x</h1></body></html>") == [
        "page did not finish loading in the browser (no load event within the time budget)"
    ]


# --- the browser ------------------------------------------------------------------------------
@pytest.mark.slow
def test_browser_check_fails_on_a_broken_page(fake_site: Path, tmp_path: Path):
    chromium = chromium_or_skip()
    shots = tmp_path / "shots"
    report = check_site(fake_site, ["index", "other", "untitled"], chromium, shots, ["other"])
    assert report["index"] == [
        "image not loaded: 'img/missing.png'",
        "image not loaded: 'img/corrupt.png'",  # on disk, so only a browser can tell it is broken
        "broken link 'nowhere.html': nowhere.html does not exist",
        "broken anchor 'other.html#nope': no id 'nope' in other.html",
    ], format_report(report)
    assert report["other"] == [], format_report(report)
    assert report["untitled"] == ["empty <h1> title"], format_report(report)
    assert (shots / "other.png").stat().st_size > 0


@pytest.mark.slow
def test_a_toc_page_that_was_not_built_is_reported(fake_site: Path):
    chromium = chromium_or_skip()
    report = check_site(fake_site, ["other", "notebooks/99_missing"], chromium)
    assert report == {
        "other": [],
        "notebooks/99_missing": [f"page not built: notebooks/99_missing.html is missing from {fake_site}"],
    }


@pytest.mark.slow
def test_every_toc_page_of_the_built_book():
    """The real check: every page of _toc.yml in _build/html, with two screenshots saved."""
    if not (BUILD / "index.html").is_file():
        pytest.skip("no built book in _build/html: run `jupyter-book build . -W -n --keep-going` first")
    chromium = chromium_or_skip()
    pages = toc_pages(ROOT / "_toc.yml")
    shot_pages = default_screenshot_pages(pages)
    report = check_site(BUILD, pages, chromium, SCREENSHOTS, shot_pages)
    assert not any(report.values()), "\n" + format_report(report)
    for name in shot_pages:
        assert (SCREENSHOTS / (name.replace("/", "__") + ".png")).stat().st_size > 0
