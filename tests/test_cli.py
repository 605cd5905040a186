"""CLI errors are one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlib.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(*args, cache: Path):
    env = {**os.environ, "KDLIB_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kdlib", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--student", "resnet9"], ["unknown model 'resnet9'", "resnet8"]),
        (["--method", "magic"], ["unknown method 'magic'", "sakd"]),
        (["--teacher", "nope", "--method", "kd"], ["unknown model 'nope'"]),
        (["--dataset", "imagenet"], ["unknown dataset 'imagenet'"]),
        (["-o", "temperature=3", "--method", "kd"], ["unknown option", "temperature"]),
        (["--profile", "huge"], ["unknown profile 'huge'"]),
    ],
)
def test_bad_names_are_one_line_errors(args, needles, tmp_path, capsys):
    # In-process for speed: the same main() the console script runs.
    rc = main(["train", "--profile", "smoke", *args] if "--profile" not in args else ["train", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert len([x for x in err.splitlines() if x.strip()]) == 1
    for n in needles:
        assert n in err


def test_incompatible_pair_is_one_line_error(tmp_path):
    # LAKD gives every student stage a teacher stage: a 4-stage VGG student cannot learn from a 3-stage ResNet.
    proc = cli("train", "--profile", "smoke", "--method", "lakd", "--teacher", "resnet8", "--student", "vgg8",
               cache=tmp_path)
    assert_one_line_error(proc, "stage")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "trained before failing"


def test_missing_cifar_names_the_directory(tmp_path):
    proc = cli("train", "--profile", "smoke", "--method", "vanilla", "--dataset", "cifar100",
               "--data-root", str(tmp_path / "nowhere"), cache=tmp_path)
    assert_one_line_error(proc, str(tmp_path / "nowhere"))


def test_corrupt_checkpoint_is_one_line_error(tmp_path):
    from kdlib.profiles import get_profile
    from kdlib.run_store import run_dir

    cfg = get_profile("smoke").config("vanilla", seed=5)
    folder = run_dir(cfg, tmp_path)
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"\x00garbage")
    proc = cli("train", "--profile", "smoke", "--method", "vanilla", "--seed", "5", cache=tmp_path)
    assert_one_line_error(proc, "corrupt", "checkpoint.pt")
