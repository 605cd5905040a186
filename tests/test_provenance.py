"""The committed notebooks carry the outputs of a complete ``book``-profile run.

The book build renders stored outputs and executes nothing, so what a reader sees is exactly what
is committed. Each notebook must therefore have stored outputs, none of them an error, and its
last code cell must print the provenance line
``kdlib <version> | profile book | torch <version> | device <device>``: outputs from a ``smoke``
run (or a half-run notebook) must not reach the book.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED_PROFILE = "book"
PROVENANCE = re.compile(
    r"^kdlib (?P<version>\S+) \| profile (?P<profile>\S+) \| torch \S+ \| device .+$", re.M
)


def _output_text(output: dict) -> str:
    """The text of one stored output (stream text or the text/plain of a result)."""
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def provenance_problems(nb: dict, expected_profile: str = EXPECTED_PROFILE) -> list[str]:
    """Everything wrong with a notebook's stored outputs (an empty list means it is fine)."""
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    if not code:
        return ["no code cells"]
    problems = []
    if not any(c.get("outputs") for c in code):
        problems.append("no stored outputs: run `make book` and commit the executed notebook")
    for number, cell in enumerate(code, start=1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(
                    f"code cell {number} stores an error: {out.get('ename')}: {out.get('evalue')}"
                )
    last_text = "".join(_output_text(o) for o in code[-1].get("outputs", []))
    found = list(PROVENANCE.finditer(last_text))
    if not found:
        problems.append(
            "the last code cell prints no provenance line 'kdlib <v> | profile <p> | torch <v> | device <d>'"
        )
    else:
        profile = found[-1]["profile"]
        if profile != expected_profile:
            problems.append(f"stored outputs come from profile {profile!r}, not {expected_profile!r}")
    return problems


# --- the committed notebooks ------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.name) for p in NOTEBOOKS]
    or [
        pytest.param(
            None, id="none", marks=pytest.mark.skip(reason="no notebooks committed in notebooks/ yet")
        )
    ],
)
def test_committed_notebook_has_book_profile_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert provenance_problems(nb) == [], f"{path.name}: stored outputs are not a clean `book` run"


# --- the check itself, on constructed notebooks -----------------------------------------------
def make_notebook(*, provenance: str | None = "book", error: bool = False, outputs: bool = True) -> dict:
    """A small notebook as `make book` would store it; the arguments break one thing at a time."""
    v4 = nbformat.v4
    first = v4.new_code_cell("x = 1 + 1\nx", execution_count=1)
    second = v4.new_code_cell("import matplotlib", execution_count=2)
    last = v4.new_code_cell(
        'print(f"kdlib {kdlib.__version__} | profile {PROFILE} | ...")', execution_count=3
    )
    if outputs:
        first.outputs = [v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
        if error:
            second.outputs = [v4.new_output("error", ename="ValueError", evalue="bad", traceback=["..."])]
        if provenance is not None:
            line = f"kdlib 0.1.0 | profile {provenance} | torch 2.14.1 | device cpu (2 threads)\n"
            last.outputs = [v4.new_output("stream", name="stdout", text=["records: 3\n", line])]
    nb = v4.new_notebook(cells=[v4.new_markdown_cell("# A chapter"), first, second, last])
    nbformat.validate(nb)  # the constructed notebooks are valid nbformat 4, like the real ones
    return json.loads(nbformat.writes(nb))  # round-trip: the same JSON the real files hold


def test_a_clean_book_run_passes():
    assert provenance_problems(make_notebook()) == []


def test_smoke_profile_outputs_fail():
    assert provenance_problems(make_notebook(provenance="smoke")) == [
        "stored outputs come from profile 'smoke', not 'book'"
    ]


def test_a_stored_error_fails():
    assert provenance_problems(make_notebook(error=True)) == ["code cell 2 stores an error: ValueError: bad"]


def test_a_notebook_without_outputs_fails():
    problems = provenance_problems(make_notebook(outputs=False))
    assert problems[0].startswith("no stored outputs")
    assert problems[1].startswith("the last code cell prints no provenance line")
    assert len(problems) == 2


def test_a_missing_provenance_line_fails():
    nb = make_notebook(provenance=None)
    assert provenance_problems(nb) == [
        "the last code cell prints no provenance line 'kdlib <v> | profile <p> | torch <v> | device <d>'"
    ]


def test_the_provenance_must_be_in_the_last_code_cell():
    nb = make_notebook()
    nb["cells"].append(nbformat.v4.new_code_cell("print('done')"))  # a cell after the provenance
    assert provenance_problems(nb)[-1].startswith("the last code cell prints no provenance line")
