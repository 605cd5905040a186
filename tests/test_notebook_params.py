"""The chapters' parameters as a reader, the test suite and papermill set them.

- A reader who sets nothing (Colab, a plain Jupyter) gets the ``book`` profile.
- Under pytest from the repository root (``pytest --nbval-lax notebooks/``) the root ``conftest.py``
  makes it ``smoke``.
- ``papermill -p SEEDS 7`` (an int) and ``-p SEEDS '[8]'`` (text) both set the seeds a chapter trains.

The first two execute a chapter's Colab, parameters and set-up cells only, then ask the kernel what
it picked; the papermill test runs a whole chapter in the ``smoke`` profile.
"""

from __future__ import annotations

import copy
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from kdlib.config import active_profile
from kdlib.profiles import get_profile
from kdlib.run_store import config_hash, run_name

ROOT = Path(__file__).resolve().parent.parent
# 01_baselines: its set-up cell only imports and reads the profile (no data, no training).
PROFILE_CHAPTER = ROOT / "notebooks" / "01_baselines.ipynb"
# 02_explain: the cheapest chapter that trains students for SEEDS (teacher + vanilla + KD).
PAPERMILL_CHAPTER = ROOT / "notebooks" / "02_explain.ipynb"
PROBE = 'print(f"picked {PROFILE} {prof.name} {list(SEEDS)}")'


def first_cells_then_probe(path: Path) -> nbformat.NotebookNode:
    """The notebook's Colab, parameters and set-up cells (up to the first cell after the parameters), then
    one cell that prints the profile and seeds they chose."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = next(i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", []))
    cells = [copy.deepcopy(c) for c in code[: params + 2]]
    nb.cells = [*cells, nbformat.v4.new_code_cell(PROBE)]
    return nb


def picked(env: dict[str, str], tmp_path: Path) -> str:
    """Execute the first cells in a fresh kernel with exactly ``env``; return the probe's line."""
    nb = first_cells_then_probe(PROFILE_CHAPTER)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute(
        env=env
    )
    return "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()


def test_a_reader_without_kdlib_profile_gets_the_book_profile(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KDLIB_PROFILE"}
    env["KDLIB_CACHE"] = str(tmp_path / "cache")  # nothing is trained, but never touch the user's cache
    assert picked(env, tmp_path) == f"picked book book {list(get_profile('book').seeds)}"


def test_pytest_from_the_root_runs_the_smoke_profile(tmp_path, monkeypatch):
    # What pytest does first when started from the root (`pytest --nbval-lax notebooks/`): load conftest.py.
    monkeypatch.delenv("KDLIB_PROFILE", raising=False)
    runpy.run_path(str(ROOT / "conftest.py"))
    assert os.environ.get("KDLIB_PROFILE") == "smoke"
    env = {**os.environ, "KDLIB_CACHE": str(tmp_path / "cache")}  # the environment nbval's kernels inherit
    assert picked(env, tmp_path) == f"picked smoke smoke {list(get_profile('smoke').seeds)}"


def test_the_root_conftest_leaves_a_chosen_profile_alone(monkeypatch):
    monkeypatch.setenv("KDLIB_PROFILE", "book")
    runpy.run_path(str(ROOT / "conftest.py"))
    assert os.environ["KDLIB_PROFILE"] == "book"


def papermill(seeds_text: str, cache: Path, cwd: Path) -> None:
    """``papermill 02_explain.ipynb out.ipynb -p SEEDS <text>`` from ``cwd``, smoke profile, private cache."""
    env = {**os.environ, "KDLIB_PROFILE": "smoke", "KDLIB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "papermill", str(PAPERMILL_CHAPTER), str(cwd / f"out-{seeds_text}.ipynb"),
           "-p", "SEEDS", seeds_text, "-p", "N_IMAGES", "16", "-k", "python3", "--no-progress-bar"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def student_seeds(cache: Path) -> dict[str, set[int]]:
    """Method -> seeds of the student runs recorded in the cache (the teacher's run left out)."""
    teacher = config_hash(get_profile("smoke").teacher_config())
    out: dict[str, set[int]] = {}
    for path in (cache / "runs").glob("*/record.json"):
        rec = json.loads(path.read_text())
        if rec["hash"] != teacher:
            out.setdefault(rec["config"]["method"], set()).add(rec["config"]["seed"])
    return out


@pytest.mark.slow
def test_papermill_sets_the_seeds_from_another_directory(tmp_path):
    cache, cwd = tmp_path / "cache", tmp_path / "elsewhere"
    cwd.mkdir()
    papermill("7", cache, cwd)  # papermill -p turns "7" into the int 7
    assert student_seeds(cache) == {"vanilla": {7}, "kd": {7}}
    papermill("[8]", cache, cwd)  # ... and passes "[8]" on as text
    assert student_seeds(cache) == {"vanilla": {7, 8}, "kd": {7, 8}}
    # The executed notebook's provenance cell lists the runs it used: the teacher and seed 8's students.
    last = [c for c in nbformat.read(cwd / "out-[8].ipynb", as_version=4).cells if c.cell_type == "code"][-1]
    used = set(re.findall(r"^  run (\S+):", "".join(o.get("text", "") for o in last.outputs), re.M))
    smoke = get_profile("smoke")
    assert used == {run_name(smoke.teacher_config()), run_name(smoke.config("vanilla", seed=8)),
                    run_name(smoke.config("kd", seed=8))}


def test_active_profile_defaults_to_book(monkeypatch):
    monkeypatch.delenv("KDLIB_PROFILE", raising=False)
    assert active_profile() == "book"
    monkeypatch.setenv("KDLIB_PROFILE", "smoke")
    assert active_profile() == "smoke"
    assert active_profile("paper") == "paper"  # an explicit profile wins over the environment
