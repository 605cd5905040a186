"""The wheels that travel to the device machine: read the manifest, check a folder, download them.

``benchmarks/gpu_wheels.txt`` names every wheel ``gpu_check.sh`` installs there (the device has no
registry). This module checks a wheel folder against it: each pinned wheel present exactly once, no
stray wheel (``pip install`` of two versions of one package fails the whole install), and the
``Requires-Dist`` of every wheel met by another wheel or by a package the device already has
(``gpu_device_packages.txt``), with markers evaluated for the device's Python 3.12 on x86-64 Linux.

    python benchmarks/gpu_wheels.py check [--dir .whl]     # exit 0: complete; 3: wheels missing; 1: broken
    python benchmarks/gpu_wheels.py files [--dir .whl]     # the wheel paths to install, one a line
    python benchmarks/gpu_wheels.py download [--dir .whl]  # pip download / pip wheel, as the manifest says
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MANIFEST = HERE / "gpu_wheels.txt"
DEVICE_PACKAGES = HERE / "gpu_device_packages.txt"
WHEEL_DIR = REPO / ".whl"
# What the device run imports that the device lacks: grad-cam (tests/test_explain.py imports it at
# collection) and the notebook runner (nbclient executes, ipykernel is the kernel).
ROOTS = ("grad-cam", "nbclient", "nbformat", "ipykernel", "jupyter-client", "jupyter-core")
# The device's interpreter, for evaluating requirement markers (KINDS.md: Python 3.12.3, x86-64 Linux).
DEVICE_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "os_name": "posix", "platform_machine": "x86_64", "extra": "",
}
# /work/.library/device/README.md's download command for the device's Python (3.12, CPython, x86-64).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


class ManifestError(Exception):
    """A malformed manifest line (the message names the line)."""


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (PEP 503)
    version: str
    build: bool = False  # sdist only on PyPI: built here with ``pip wheel``

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass
class FolderReport:
    present: dict[str, Path] = field(default_factory=dict)  # canonical name -> wheel
    missing: list[Pin] = field(default_factory=list)
    duplicates: dict[str, list[Path]] = field(default_factory=dict)  # two wheels of one package
    stray: list[Path] = field(default_factory=list)  # wheels the manifest does not name (or another version)
    unmet: dict[str, list[str]] = field(default_factory=dict)  # wheel -> requirements nothing provides

    @property
    def broken(self) -> bool:
        return bool(self.duplicates or self.stray or self.unmet)


# --- the manifest ----------------------------------------------------------------------------------
def read_manifest(path: Path = MANIFEST) -> list[Pin]:
    """The pins of ``path``: ``NAME==VERSION [build]`` lines; ``#`` starts a comment."""
    pins: dict[str, Pin] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{Path(path).name} line {number}"
        if len(words) > 2 or (len(words) == 2 and words[1] != "build"):
            raise ManifestError(f"{where}: expected 'NAME==VERSION' or 'NAME==VERSION build', got {raw.strip()!r}")
        name, sep, version = words[0].partition("==")
        if not sep or not name or not version:
            raise ManifestError(f"{where}: {words[0]!r} is not pinned as NAME==VERSION")
        pin = Pin(canonicalize_name(name), version, build=len(words) == 2)
        if pin.name in pins:
            raise ManifestError(f"{where}: {pin.name} is listed twice")
        pins[pin.name] = pin
    return list(pins.values())


def read_device_packages(path: Path = DEVICE_PACKAGES) -> set[str]:
    return {canonicalize_name(line.strip()) for line in Path(path).read_text().splitlines()
            if line.strip() and not line.startswith("#")}


# --- a wheel folder --------------------------------------------------------------------------------
def check_folder(pins: list[Pin], folder: Path, device: set[str]) -> FolderReport:
    """Which pinned wheels ``folder`` holds, what else it holds, and (if complete) what stays unmet."""
    wanted = {p.name: p for p in pins}
    found: dict[str, list[Path]] = {}
    report = FolderReport()
    for path in sorted(Path(folder).glob("*.whl")) if Path(folder).is_dir() else []:
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            report.stray.append(path)
            continue
        pin = wanted.get(name)
        if pin is None or str(version) != pin.version:
            report.stray.append(path)
        else:
            found.setdefault(name, []).append(path)
    for name, paths in found.items():
        if len(paths) > 1:
            report.duplicates[name] = paths
        report.present[name] = paths[0]
    report.missing = [p for p in pins if p.name not in found]
    if not report.missing:
        report.unmet = unmet_requirements(report.present, device)
    return report


def wheel_requirements(path: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            return []
        message = Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
    return message.get_all("Requires-Dist") or []


def applicable(requirements: list[str]) -> list[Requirement]:
    """The requirements that apply on the device: extras left out, markers evaluated for it."""
    out = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate(DEVICE_MARKERS):
            out.append(req)
    return out


def unmet_requirements(wheels: dict[str, Path], device: set[str]) -> dict[str, list[str]]:
    """For each wheel, the requirements that no other wheel (of a fitting version) nor the device provides."""
    versions = {name: parse_wheel_filename(path.name)[1] for name, path in wheels.items()}
    gaps = {}
    for name, path in wheels.items():
        missing = []
        for req in applicable(wheel_requirements(path)):
            dep = canonicalize_name(req.name)
            if dep in versions:
                if not req.specifier.contains(versions[dep], prereleases=True):
                    missing.append(f"{req} (the wheel is {versions[dep]})")
            elif dep not in device:
                missing.append(str(req))
        if missing:
            gaps[name] = sorted(missing)
    return gaps


def installed_closure(roots=ROOTS, device: set[str] | None = None) -> dict[str, str]:
    """``roots`` and everything they need that the device lacks, as installed in this environment."""
    from importlib.metadata import PackageNotFoundError, distribution

    device = read_device_packages() if device is None else device
    found, todo = {}, [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in device:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            found[name] = "not installed here"
            continue
        found[name] = dist.version
        todo.extend(canonicalize_name(r.name) for r in applicable(dist.requires or []))
    return found


# --- commands --------------------------------------------------------------------------------------
def download_commands(pins: list[Pin], folder: Path, python: str = "python3") -> list[list[str]]:
    """The pip commands that fetch ``pins`` into ``folder`` (download, then build the sdist-only ones)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    fetch = [p.spec for p in pins if not p.build]
    build = [p.spec for p in pins if p.build]
    commands = []
    if fetch:
        commands.append([python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                         "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *fetch])
    if build:
        commands.append([python, "-m", "pip", "wheel", "--no-deps", "-w", str(folder), *build])
    return commands


def describe(report: FolderReport, pins: list[Pin], folder: Path) -> str:
    lines = [f"wheels in {folder}: {len(report.present)} of {len(pins)} present"]
    lines += [f"  MISSING {p.spec}" + (" (sdist only: built with pip wheel)" if p.build else "")
              for p in report.missing]
    lines += [f"  DUPLICATE {name}: {', '.join(p.name for p in paths)}" for name, paths in report.duplicates.items()]
    lines += [f"  STRAY {p.name} (not in {MANIFEST.name}: remove it, pip would install it too)" for p in report.stray]
    lines += [f"  UNMET {name} needs {', '.join(reqs)} (add to {MANIFEST.name})" for name, reqs in report.unmet.items()]
    if report.missing:
        lines.append("download the missing ones, here in the repository root, with:")
        lines += ["  " + " ".join(cmd) for cmd in download_commands(report.missing, folder)]
        lines.append(f"  (or all of them: make gpu-wheels, i.e. python {Path(__file__).name} download)")
    elif not report.broken:
        lines.append(f"  complete: every requirement is a wheel here or on the device ({DEVICE_PACKAGES.name})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("check", "files", "download"))
    p.add_argument("--dir", type=Path, default=WHEEL_DIR, help="wheel folder (default: .whl in the repository)")
    args = p.parse_args(argv)
    try:
        pins = read_manifest(MANIFEST)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.action == "download":
        args.dir.mkdir(parents=True, exist_ok=True)
        for cmd in download_commands(pins, args.dir, python=sys.executable):
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        return 0
    report = check_folder(pins, args.dir, read_device_packages(DEVICE_PACKAGES))
    if args.action == "files":
        if report.missing or report.broken:
            print(describe(report, pins, args.dir), file=sys.stderr)
            return 1
        print("\n".join(str(report.present[p.name]) for p in pins))
        return 0
    print(describe(report, pins, args.dir))
    return 1 if report.broken else 3 if report.missing else 0


if __name__ == "__main__":
    sys.exit(main())
