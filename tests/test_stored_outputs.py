"""What a stored notebook output must not hold: progress-bar refreshes, warnings, a frozen failed check.

The book renders stored outputs, so each tqdm refresh would be its own box and a library warning
would be printed to every reader; nbval compares ``# NBVAL_CHECK_OUTPUT`` cells with what is stored,
so a check that *printed* ``False`` would be frozen as the expected answer. The chapters assert
instead of printing, and the engine prints one line per run when not on a terminal; the first tests
hold every committed chapter to that, the others check the checker on constructed notebooks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from test_provenance import _output_text as _text

BAR = re.compile(r"\r|it/s\]|s/it\]|\d+%\|")
CHECK_WORDS = ("==", "match", "agree", "equal")


def failed_check(text: str) -> bool:
    """A printed check that came out False: a check line ending in False, or ``… == x: False``.

    ``pair_keys=False`` in a line that says what was checked is an option's value, not a result.
    """
    for line in text.splitlines():
        end = line.rstrip().rstrip(",.;)")
        if any(w in line.lower() for w in CHECK_WORDS) and end.endswith("False"):
            return True
        if re.search(r"==\s*[\w.']+\s*:\s*False\b", line) or re.search(r":\s*False\s*$", line):
            return True
    return False


def stored_output_problems(nb: dict) -> list[str]:
    """Progress-bar fragments, warnings or stderr, and failed checks frozen by NBVAL_CHECK_OUTPUT."""
    problems = []
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    for number, cell in enumerate(code, start=1):
        checked = "NBVAL_CHECK_OUTPUT" in "".join(cell.get("source", ""))
        for out in cell.get("outputs", []):
            text = _text(out)
            if out.get("output_type") == "stream" and BAR.search(text):
                problems.append(f"code cell {number} stores a progress-bar fragment")
            if out.get("name") == "stderr" or "Warning" in text:
                problems.append(f"code cell {number} stores a warning or stderr output")
            if checked and failed_check(text):
                problems.append(f"code cell {number} (NBVAL_CHECK_OUTPUT) stores a failed check: assert instead")
    return problems


NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_a_committed_chapter_stores_no_bar_warning_or_frozen_failure(path: Path):
    assert stored_output_problems(json.loads(path.read_text(encoding="utf-8"))) == []


def notebook(*cells: tuple[str, list[dict]]) -> dict:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src, outputs=[nbformat.from_dict(o) for o in outs]) for src, outs in cells]
    return nb


def stream(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def test_a_clean_notebook_has_no_problem():
    nb = notebook(("print('x')", [stream("trained kd-resnet8-s0-abc: top-1 91.20 % (last epoch) in 52 s\n")]),
                  ("# NBVAL_CHECK_OUTPUT\nprint('inline loss == kdlib (asserted)')",
                   [stream("inline loss == kdlib (asserted)\n")]),
                  ("# NBVAL_CHECK_OUTPUT\nprint(...)",
                   [stream("inline L == kdlib's for the default, pair_keys=False and positional=False: checked\n")]))
    assert stored_output_problems(nb) == []


@pytest.mark.parametrize("text", ["kd resnet8:  45%|####5     | 9/20 [00:10<00:12,  1.1s/it]",
                                  "\rkd resnet8: 100%|##########| 20/20", "epoch 3: 12.5it/s]"])
def test_a_stored_progress_bar_refresh_is_found(text):
    assert stored_output_problems(notebook(("run()", [stream(text)]))) == ["code cell 1 stores a progress-bar fragment"]


def test_a_stored_warning_or_stderr_is_found():
    warn = stream("[W1201 CPUAllocator.cpp:245] Memory block of unknown size was allocated", name="stderr")
    user = stream("UserWarning: something deprecated\n")
    assert len(stored_output_problems(notebook(("a", [warn]), ("b", [user])))) == 2


@pytest.mark.parametrize("text", ["inline == kdlib: False\n", "losses match: False\n", "sums agree with kdlib False\n"])
def test_a_frozen_failed_check_is_found(text):
    nb = notebook(("# NBVAL_CHECK_OUTPUT\nprint(check())", [stream(text)]))
    assert stored_output_problems(nb) == ["code cell 1 (NBVAL_CHECK_OUTPUT) stores a failed check: assert instead"]
    # The same text in an unchecked cell is a printed result, not a frozen check.
    assert stored_output_problems(notebook(("print(check())", [stream(text)]))) == []
