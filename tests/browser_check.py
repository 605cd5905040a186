"""Open every page of the built book in headless Chromium and report what a reader would see broken.

For each page listed in ``_toc.yml`` (after ``jupyter-book build``):

- the rendered page has a title: its first ``<h1>`` has non-empty text;
- every ``<img>`` loaded (``naturalWidth > 0`` in the browser);
- every internal link (``<a href>`` to a local file, with or without ``#anchor``) resolves to an
  existing file, and the anchor exists in the target page.

Why a browser: whether an image loaded is only known after the browser fetched and decoded it.
The pages are served by a throw-away ``http.server`` on a free localhost port that appends a small
script to each HTML page; on ``load`` the script writes every image's ``naturalWidth`` into a
``data-`` attribute, so ``chromium --dump-dom`` returns the answer as plain HTML. Links are checked
on the files on disk, which is what a reader's browser would fetch.

Usage: ``python tests/browser_check.py [--html _build/html] [--toc _toc.yml] [--screenshots DIR]``;
exit status 1 when any page has a problem, 2 when Chromium or the build is missing.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
)
DONE_ATTR = "data-kdcheck-done"
WIDTH_ATTR = "data-kdcheck-natural-width"

# Appended to every served HTML page. Lazy images are switched to eager first, so that an image
# below the fold is fetched too and the window's load event waits for it.
PROBE_SCRIPT = f"""
<script>
document.querySelectorAll('img').forEach(function (img) {{ img.loading = 'eager'; }});
window.addEventListener('load', function () {{
  document.querySelectorAll('img').forEach(function (img) {{
    img.setAttribute('{WIDTH_ATTR}', String(img.naturalWidth));
  }});
  document.documentElement.setAttribute('{DONE_ATTR}', '1');
}});
</script>
"""


VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)


# --- table of contents ------------------------------------------------------------------------
def toc_pages(toc_path: Path | str) -> list[str]:
    """Document names (no suffix) of the root and every ``file:`` entry of a jb-book toc, in order."""
    toc = yaml.safe_load(Path(toc_path).read_text())
    pages = [_strip_suffix(toc["root"])]

    def walk(entries: Iterable[dict]) -> None:
        for entry in entries or ():
            if "file" in entry:
                pages.append(_strip_suffix(entry["file"]))
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key, ()))

    walk(toc.get("parts", ()))
    walk(toc.get("chapters", ()))
    return pages


def _strip_suffix(name: str) -> str:
    for suffix in (".md", ".ipynb", ".rst"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- HTML parsing -----------------------------------------------------------------------------
class _PageParser(HTMLParser):
    """Collects ids, link targets, images and the first ``<h1>``'s text of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.images: list[dict[str, str]] = []
        self.root_attrs: dict[str, str] = {}
        self.h1_text: str | None = None
        self._h1_depth = 0  # >0 while inside the first <h1>
        self._skip_depth = 0  # >0 inside a Sphinx "¶/#" permalink within the <h1>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "html":
            self.root_attrs = a
        for key in ("id", "name"):
            if a.get(key) and (key == "id" or tag == "a"):
                self.ids.add(a[key])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "img":
            self.images.append(a)
        if tag == "h1" and self.h1_text is None and self._h1_depth == 0:
            self._h1_depth = 1
            self.h1_text = ""
        elif self._h1_depth and tag not in VOID_ELEMENTS:  # a void element opens nothing
            self._h1_depth += 1
            if tag == "a" and "headerlink" in a.get("class", "").split():
                self._skip_depth = self._h1_depth

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_ELEMENTS:
            return
        if self._h1_depth:
            if self._skip_depth == self._h1_depth:
                self._skip_depth = 0
            self._h1_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._h1_depth and not self._skip_depth:
            self.h1_text += data


def parse_page(html: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser


# --- static checks (no browser) ---------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _ids_of(path: Path) -> frozenset[str]:
    return frozenset(parse_page(path.read_text(encoding="utf-8", errors="replace")).ids)


def check_links(html_root: Path | str, page: str) -> list[str]:
    """Problems with the internal ``<a href>`` links of ``<page>.html`` (files and anchors)."""
    html_root = Path(html_root).resolve()
    path = html_root / f"{page}.html"
    problems = []
    for href in dict.fromkeys(parse_page(path.read_text(encoding="utf-8")).hrefs):  # unique, ordered
        parts = urlsplit(href)
        if parts.scheme or parts.netloc or href.startswith("//"):
            continue  # external (http, mailto, javascript, ...)
        target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"broken link {href!r}: {os.path.relpath(target, html_root)} does not exist")
            continue
        anchor = unquote(parts.fragment)
        if anchor and target.suffix == ".html" and anchor not in _ids_of(target):
            where = os.path.relpath(target, html_root)
            problems.append(f"broken anchor {href!r}: no id {anchor!r} in {where}")
    return problems


# --- browser ----------------------------------------------------------------------------------
def find_chromium() -> str | None:
    """Path of a Chromium binary (``$CHROMIUM`` first), or None."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


class _ProbingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; HTML pages get :data:`PROBE_SCRIPT` appended before ``</body>``."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            super().do_GET()
            return
        html = path.read_text(encoding="utf-8", errors="replace")
        cut = html.rfind("</body>")
        html = html + PROBE_SCRIPT if cut < 0 else html[:cut] + PROBE_SCRIPT + html[cut:]
        body = html.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # quiet: the report says what matters
        pass


@contextmanager
def serve(folder: Path | str) -> Iterator[str]:
    """Serve ``folder`` on a free localhost port for the duration of the block; yields the base URL."""
    handler = functools.partial(_ProbingHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _run_chromium(chromium: str, extra: list[str], url: str, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="kdcheck-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def render_dom(chromium: str, url: str, timeout: float = 60) -> str:
    """The DOM of ``url`` after its load event, as HTML (``chromium --dump-dom``)."""
    return _run_chromium(chromium, ["--dump-dom"], url, timeout).stdout


def screenshot(chromium: str, url: str, out: Path, size: tuple[int, int] = (1280, 1600)) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    _run_chromium(chromium, [f"--screenshot={out}", f"--window-size={size[0]},{size[1]}"], url, 60)
    return out.is_file() and out.stat().st_size > 0


def check_rendered(dom: str) -> list[str]:
    """Problems visible in a rendered DOM dumped with :data:`PROBE_SCRIPT` in place."""
    page = parse_page(dom)
    if page.root_attrs.get(DONE_ATTR) != "1":
        return ["page did not finish loading in the browser (no load event within the time budget)"]
    problems = []
    if page.h1_text is None:
        problems.append("no <h1> title")
    elif not page.h1_text.strip():
        problems.append("empty <h1> title")
    for img in page.images:
        src = img.get("src", "")
        if src.startswith(("http://", "https://", "//")) and "127.0.0.1" not in src and "localhost" not in src:
            # Badges from other sites (Colab): CI and this machine have no internet, so only the
            # book's own images are checked; the links behind badges are checked as links elsewhere.
            continue
        if img.get(WIDTH_ATTR, "0") in ("", "0"):
            shown = src if len(src) < 80 else src[:77] + "..."
            problems.append(f"image not loaded: {shown!r}")
    return problems


# --- the whole site ---------------------------------------------------------------------------
def check_site(
    html_root: Path | str,
    pages: list[str],
    chromium: str,
    screenshot_dir: Path | str | None = None,
    screenshot_pages: Iterable[str] = (),
) -> dict[str, list[str]]:
    """``{page: [problem, ...]}`` for every page (an empty list means the page is fine)."""
    html_root = Path(html_root)
    wanted_shots = set(screenshot_pages)
    report: dict[str, list[str]] = {}
    with serve(html_root) as base:
        for page in pages:
            if not (html_root / f"{page}.html").is_file():
                report[page] = [f"page not built: {page}.html is missing from {html_root}"]
                continue
            url = base + page + ".html"
            report[page] = check_rendered(render_dom(chromium, url)) + check_links(html_root, page)
            if screenshot_dir is not None and page in wanted_shots:
                out = Path(screenshot_dir) / (page.replace("/", "__") + ".png")
                if not screenshot(chromium, url, out):
                    report[page].append(f"screenshot failed: {out}")
    return report


def default_screenshot_pages(pages: list[str]) -> list[str]:
    """Two chapters to look at: the first notebook chapter and the first method chapter (``notebooks/1*``).

    Without a method chapter, the first two notebook chapters, filled up with the first other pages.
    """
    chapters = [p for p in pages if p.startswith("notebooks/")]
    methods = [p for p in chapters[1:] if p.startswith("notebooks/1")]
    picked = (chapters[:1] + methods[:1]) if methods else chapters[:2]
    return (picked + [p for p in pages if p not in picked])[:2]


def format_report(report: dict[str, list[str]]) -> str:
    lines = []
    for page, problems in report.items():
        lines.append(f"{'FAIL' if problems else 'ok  '} {page}")
        lines += [f"       - {p}" for p in problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default="_build/html", help="the built HTML folder")
    ap.add_argument("--toc", default="_toc.yml", help="the book's table of contents")
    ap.add_argument("--screenshots", default="_build/screenshots", help="where two page screenshots go")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("chromium not installed: run make test as root or apt-get install chromium", file=sys.stderr)
        return 2
    if not (Path(args.html) / "index.html").is_file():
        print(f"no built book in {args.html}: run jupyter-book build . first", file=sys.stderr)
        return 2
    pages = toc_pages(args.toc)
    report = check_site(args.html, pages, chromium, args.screenshots, default_screenshot_pages(pages))
    print(format_report(report))
    bad = sum(1 for p in report.values() if p)
    print(f"{len(report) - bad}/{len(report)} pages fine; screenshots in {args.screenshots}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
