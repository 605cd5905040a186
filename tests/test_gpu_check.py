"""The prepared device run (benchmarks/gpu_check.sh), checked without a GPU.

Its dry run (what ``make gpu-check-dry-run`` runs), a rehearsal of the real run on the CPU in the smoke
profile, the wheel manifest against constraints.txt and this environment's installed metadata, and the
parity rule of benchmarks/gpu_parity.py on records made from the committed CPU ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
BOOK = REPO / "results" / "book"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


wheels = _load("gpu_wheels")
parity = _load("gpu_parity")


def _run(*args, cwd=REPO, script=SCRIPT, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=600)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# --- the dry run -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_passes_without_a_gpu_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = _run("--dry-run", OUT=str(out), KDLIB_WHEELS=str(tmp_path / "no_wheels"))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "dry run passed" in text and "FAIL" not in text
    for pin in wheels.read_manifest():  # no wheels here: each one reported, with the command to fetch it
        assert f"MISSING {pin.spec}" in text
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in text
    assert "pip wheel --no-deps" in text and "WARN wheels missing" in text
    selected = int(text.split("pytest -m cuda selects ")[1].split()[0])
    assert selected >= 3  # tests/test_data.py's and tests/test_precision.py's CUDA tests at least
    assert f"ok   CPU reference: kd on seeds {sorted(_cpu_kd())}" in text
    assert not out.exists()


def test_dry_run_fails_on_missing_files(tmp_path):
    """A copy of the script without the repository around it: every missing file is named, exit 1."""
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_check.sh"
    shutil.copy(SCRIPT, script)
    result = _run("--dry-run", cwd=tmp_path, script=script)
    assert result.returncode == 1
    for missing in ("benchmarks/bench_speed.py", "benchmarks/gpu_parity.py", "notebooks/01_baselines.ipynb",
                    "results/book", "kdlib/precision.py"):
        assert f"FAIL file {missing} is missing" in result.stdout
    assert "dry run FAILED" in result.stdout


def test_unknown_argument_is_refused(tmp_path):
    result = _run("--dryrun", OUT=str(tmp_path / "out"))
    assert result.returncode == 2 and "usage" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal stands in for a GPU on a machine without one")
def test_rehearsal_on_the_cpu_runs_every_stage(tmp_path):
    """The real run path with CPU stand-ins: the stages run in order, each under its limit, and what
    comes back is under $OUT (at most 8 files) while results/book stays as committed."""
    out = tmp_path / "out"
    before = _digest(BOOK)
    result = _run(OUT=str(out), KDLIB_WHEELS=str(tmp_path / "no_wheels"), GPU_CHECK_PROFILE="smoke",
                  GPU_CHECK_BENCH_ARGS="--quick --device cpu --methods kd --batch-sizes 8 --samples 32 "
                                       "--timed-samples 16 --distill-steps 1")
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 1, log  # install (no wheels) and parity (no GPU records) fail, as they must
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["install", "tests", "bench", "chapter", "parity"]
    assert {k: s["exit"] for k, s in stages.items()} == {"install": 1, "tests": 0, "bench": 0, "chapter": 0,
                                                          "parity": 2}
    assert sum(s["limit_s"] for s in stages.values()) <= 540  # 9 minutes
    assert all(0 < s["seconds"] < s["limit_s"] for s in stages.values())
    assert summary["chapter_wall_time_s"] == stages["chapter"]["seconds"]
    assert "MISSING grad-cam==1.5.7" in log and "no complete GPU record" in log
    assert "deselected" in log and "needs a GPU" in log  # pytest -m cuda ran, its tests skipped here
    names = {p.name for p in out.iterdir()}
    assert names == {"gpu_check.log", "summary.json", "speed_cuda.json", "speed_cuda.png", "01_baselines.ipynb"}
    assert json.loads((out / "speed_cuda.json").read_text())["settings"]["methods"] == ["kd"]
    executed = json.loads((out / "01_baselines.ipynb").read_text())
    assert any(o.get("output_type") == "stream" and "profile smoke" in "".join(o.get("text", ""))
               for c in executed["cells"] for o in c.get("outputs", []))
    assert _digest(BOOK) == before


# --- the wheel manifest ----------------------------------------------------------------------------
def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[wheels.canonicalize_name(name)] = version
    return pins


def test_manifest_pins_are_the_constraints_pins():
    constraints = _constraints()
    for pin in wheels.read_manifest():
        assert constraints.get(pin.name) == pin.version, pin.spec


def test_manifest_is_the_closure_of_what_the_run_imports():
    """Every package grad-cam and the notebook runner need that the device lacks, and nothing else."""
    manifest = {p.name: p.version for p in wheels.read_manifest()}
    assert wheels.installed_closure() == manifest
    assert not set(manifest) & wheels.read_device_packages()  # never a second version of a device package
    assert {"torch", "torchvision", "numpy", "matplotlib", "scipy", "pytest"} <= wheels.read_device_packages()


@pytest.mark.parametrize("line, message", [
    ("nbclient", "is not pinned"),
    ("nbclient>=0.1", "is not pinned"),
    ("nbclient==0.11.0 compile", "expected 'NAME==VERSION'"),
])
def test_bad_manifest_lines_are_named(tmp_path, line, message):
    path = tmp_path / "m.txt"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(wheels.ManifestError, match=f"m.txt line 3: .*{message}"):
        wheels.read_manifest(path)


def test_a_package_listed_twice_is_refused(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("Jupyter_Core==5.9.1\njupyter-core==5.9.1  # again, spelled otherwise\n")
    with pytest.raises(wheels.ManifestError, match="line 2: jupyter-core is listed twice"):
        wheels.read_manifest(path)


def _wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}-{version}.dist-info/METADATA", meta)
    return path


def test_folder_check_finds_missing_duplicate_and_stray_wheels(tmp_path):
    pins = [wheels.Pin("nbclient", "0.11.0"), wheels.Pin("traitlets", "5.16.1"), wheels.Pin("grad-cam", "1.5.7", True)]
    _wheel(tmp_path, "nbclient", "0.11.0")
    _wheel(tmp_path, "traitlets", "5.16.1")
    _wheel(tmp_path, "traitlets", "5.14.0")  # another version: pip would install both and fail
    (tmp_path / "grad_cam-1.5.7-py3-none-any.whl.part").write_text("")  # not a wheel: ignored
    report = wheels.check_folder(pins, tmp_path, device=set())
    assert set(report.present) == {"nbclient", "traitlets"}
    assert report.missing == [pins[2]] and [p.name for p in report.stray] == ["traitlets-5.14.0-py3-none-any.whl"]
    assert report.broken and report.unmet == {}  # requirements are checked once nothing is missing
    text = wheels.describe(report, pins, tmp_path)
    assert "MISSING grad-cam==1.5.7 (sdist only" in text and "STRAY traitlets-5.14.0" in text
    assert f"pip wheel --no-deps -w {tmp_path} grad-cam==1.5.7" in text


def test_requirements_are_evaluated_for_the_device(tmp_path):
    _wheel(tmp_path, "ipykernel", "7.4.0", [
        "comm>=0.1.1", "appnope>=0.1.2; platform_system == 'Darwin'", "tomli; python_version < '3.11'",
        "pytest; extra == 'test'", "psutil>=5.7", "tornado>=6.5.7",
    ])
    _wheel(tmp_path, "comm", "0.2.3")
    _wheel(tmp_path, "tornado", "6.4.0")
    pins = [wheels.Pin("ipykernel", "7.4.0"), wheels.Pin("comm", "0.2.3"), wheels.Pin("tornado", "6.4.0")]
    report = wheels.check_folder(pins, tmp_path, device={"psutil"})
    # Darwin-only, Python < 3.11 and extras do not apply on the device; psutil is there; tornado is too old.
    assert report.unmet == {"ipykernel": ["tornado>=6.5.7 (the wheel is 6.4.0)"]}
    (tmp_path / "tornado-6.4.0-py3-none-any.whl").unlink()
    _wheel(tmp_path, "tornado", "6.6.1")
    pins[2] = wheels.Pin("tornado", "6.6.1")
    report = wheels.check_folder(pins, tmp_path, device={"psutil"})
    assert report.unmet == {} and not report.broken and not report.missing


def test_download_commands_are_the_device_readme_commands(tmp_path):
    pins = [wheels.Pin("pyzmq", "27.3.0"), wheels.Pin("grad-cam", "1.5.7", build=True)]
    fetch, build = wheels.download_commands(pins, tmp_path)
    assert fetch[:9] == ["python3", "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                         "3.12", "--implementation"]
    assert fetch.count("--platform") == 5 and "manylinux_2_28_x86_64" in fetch and "manylinux1_x86_64" in fetch
    assert fetch[-3:] == ["-d", str(tmp_path), "pyzmq==27.3.0"]
    assert build == ["python3", "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), "grad-cam==1.5.7"]


def test_files_lists_the_wheels_only_when_complete(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "m.txt"
    manifest.write_text("traitlets==5.16.1\ncomm==0.2.3\n")
    monkeypatch.setattr(wheels, "MANIFEST", manifest)
    folder = tmp_path / "whl"
    folder.mkdir()
    _wheel(folder, "comm", "0.2.3", ["traitlets>=4"])
    assert wheels.main(["files", "--dir", str(folder)]) == 1
    assert wheels.main(["check", "--dir", str(folder)]) == 3  # missing, not broken
    _wheel(folder, "traitlets", "5.16.1")
    capsys.readouterr()
    assert wheels.main(["files", "--dir", str(folder)]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "traitlets-5.16.1-py3-none-any.whl"),
                                               str(folder / "comm-0.2.3-py3-none-any.whl")]
    assert wheels.main(["check", "--dir", str(folder)]) == 0


# --- the parity check ------------------------------------------------------------------------------
def _gpu_copies(folder: Path, shift: dict[int, float], names=("kd", "vanilla-resnet14")) -> list[str]:
    """GPU records made from the committed CPU records of ``names``: top-1 moved by ``shift[seed]``."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for path in sorted(BOOK.glob("*.json")):
        record = json.loads(path.read_text())
        if not any(path.name.startswith(n + "-") for n in names) or not parity.default_options(record["config"]):
            continue
        record["device"], record["precision"] = "cuda: NVIDIA H200", "bf16-autocast"
        record["top1_last"] += shift.get(record["seed"], 0.0)
        (folder / path.name).write_text(json.dumps(record))
        made.append(record["name"])
    return made


def _cpu_kd() -> dict[int, float]:
    return {r["seed"]: r["top1_last"] for r in map(json.loads, map(Path.read_text, BOOK.glob("kd-*.json")))
            if parity.default_options(r["config"])}


def test_parity_within_the_seed_spread(tmp_path, capsys):
    gpu = tmp_path / "gpu"
    shift = dict(zip(sorted(_cpu_kd()), [0.3, -0.2, 0.5, 0.1, -0.2]))  # the committed seeds (five in the book)
    made = _gpu_copies(gpu, shift)
    code = parity.main(["--gpu", str(gpu), "--out", str(tmp_path / "p.json"), "--tar", str(tmp_path / "r.tgz")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["checked"] == "kd (resnet14 → resnet8)" and result["within_spread"] is True
    kd = result["runs"]["kd (resnet14 → resnet8)"]
    cpu = _cpu_kd()
    assert kd["seeds"] == sorted(cpu) and kd["cpu_top1_last"] == [cpu[s] for s in sorted(cpu)]
    assert kd["paired_difference"] == pytest.approx([shift[s] for s in sorted(cpu)])
    assert kd["difference_of_means"] == pytest.approx(sum(shift.values()) / len(shift))
    assert kd["allowed"] == pytest.approx(2 * kd["cpu_std"]) and kd["gpu_precision"] == ["bf16-autocast"]
    assert 0 < kd["paired_t_pvalue"] < 1
    teacher = result["runs"]["vanilla (resnet14)"]
    assert teacher["within_spread"] is None and "one seed" in teacher["note"]
    assert "the GPU records say: bf16-autocast" in printed and "<- the check" in printed
    with tarfile.open(tmp_path / "r.tgz") as tar:
        assert sorted(tar.getnames()) == sorted(f"book_gpu/{n}.json" for n in made)


def test_parity_outside_the_spread_fails(tmp_path, capsys):
    gpu = tmp_path / "gpu"
    _gpu_copies(gpu, {seed: -9.0 for seed in _cpu_kd()})
    assert parity.main(["--gpu", str(gpu)]) == 1
    assert "OUTSIDE" in capsys.readouterr().out


def test_parity_needs_gpu_records_of_the_checked_method(tmp_path, capsys):
    assert parity.main(["--gpu", str(BOOK)]) == 2  # the committed records are all CPU ones
    assert "no complete GPU record" in capsys.readouterr().err
    _gpu_copies(tmp_path / "gpu", {}, names=("vanilla-resnet14",))
    assert parity.main(["--gpu", str(tmp_path / "gpu")]) == 2
    assert "no GPU run of 'kd'" in capsys.readouterr().err


def test_parity_dry_run_checks_the_cpu_side(tmp_path, capsys):
    assert parity.main(["--dry-run"]) == 0
    assert f"kd on seeds {sorted(_cpu_kd())}" in capsys.readouterr().out
    assert parity.main(["--dry-run", "--cpu", str(tmp_path)]) == 2
    assert "at least two seeds" in capsys.readouterr().err
