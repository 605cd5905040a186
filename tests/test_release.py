"""What a reader installs and cites matches this version of kdlib.

Each chapter's Colab cell installs the release tag of ``kdlib.__version__`` (the version whose outputs
are stored), so bumping the version without updating the notebooks and the changelog fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import kdlib

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPO = "https://github.com/attention-kd/attention-kd-book"
INSTALL = re.compile(r'%pip install -q "(?P<requirement>[^"]+)"')


def colab_cell(path: Path) -> str:
    """The source of the notebook's first code cell, the one that installs kdlib on Colab."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return "".join(code[0]["source"])


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_cell_installs_this_release_without_extras(path: Path):
    source = colab_cell(path)
    assert 'if "google.colab" in sys.modules:' in source  # nowhere else
    installs = INSTALL.findall(source)
    # Only what the notebooks import: kdlib's own dependencies, not the [book] extra (Jupyter Book, Sphinx).
    assert installs == [f"kdlib @ git+{REPO}@v{kdlib.__version__}"], f"{path.name}: {installs}"


def test_changelog_has_an_entry_for_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    entry = re.compile(rf"^## \[{re.escape(kdlib.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", re.M)
    assert entry.search(changelog), f"CHANGELOG.md has no '## [{kdlib.__version__}] - YYYY-MM-DD' entry"
    link = re.compile(rf"^\[{re.escape(kdlib.__version__)}\]: {re.escape(REPO)}/releases/tag/v", re.M)
    assert link.search(changelog), "CHANGELOG.md does not link the version to its release tag"


def test_citation_names_this_version():
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    version = re.search(r'^version: "?([^"\s]+)"?$', citation, re.M)
    assert version and version[1] == kdlib.__version__, f"CITATION.cff: version {version and version[1]}"


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements or constraints file (name lower-cased)."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", path.read_text(encoding="utf-8"), re.M)
    return {name.lower(): version for name, version in found}


def test_binder_installs_the_tested_torch_then_kdlib_from_the_copy():
    binder = ROOT / ".binder"
    requirements = pins(binder / "requirements.txt")
    tested = pins(ROOT / "constraints.txt")
    assert requirements == {"torch": tested["torch"], "torchvision": tested["torchvision"]}
    # repo2docker installs requirements.txt before copying the repository: nothing local may be named there.
    text = (binder / "requirements.txt").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(-e|-r|-c|\.)", text, re.M)
    post_build = binder / "postBuild"
    assert post_build.stat().st_mode & 0o111, "postBuild must be executable"
    assert "pip install --no-cache-dir -c constraints.txt -e ." in post_build.read_text(encoding="utf-8")
    assert (binder / "runtime.txt").read_text().strip() == "python-3.11"  # the Python constraints.txt is tested on
