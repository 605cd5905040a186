"""The wheel a user installs holds the library only: no tests, notebooks, results or book pages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import kdlib

ROOT = Path(__file__).resolve().parent.parent
# Build from a copy: setuptools writes build/ and *.egg-info next to the sources, and a stale build/lib
# left by an earlier build would leak old files into the wheel.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv*", "_build", "build", "dist", "*.egg-info", "__pycache__",
                                    ".kdlib-cache", "data", ".pytest_cache", ".ruff_cache")


def test_the_wheel_holds_only_kdlib(tmp_path):
    src, out = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_COPIED, symlinks=True)
    # No build isolation: the installed setuptools (a dev dependency) builds it, offline.
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(out), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = out.glob("*.whl")
    assert wheel.name == f"kdlib-{kdlib.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"kdlib-{kdlib.__version__}.dist-info/"
    assert [n for n in names if not n.startswith(("kdlib/", dist_info))] == []
    assert "kdlib/__init__.py" in names and "kdlib/distill/sakd.py" in names
    assert not [n for n in names if n.endswith((".ipynb", ".pyc")) or "/tests/" in n or n.startswith("kdlib/test")]
    assert f"{dist_info}licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert "Project-URL: Repository, https://github.com/attention-kd/attention-kd-book" in metadata
    assert "Classifier: Programming Language :: Python :: 3" in metadata
