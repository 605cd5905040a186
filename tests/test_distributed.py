"""torchrun with 2 CPU processes (gloo): both ranks end with the same student, one record is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kdlib.profiles import get_profile
from kdlib.train import EngineOptions, run

out = Path(sys.argv[1])

def dump(distiller):
    torch.save(distiller.student.state_dict(), out / f"rank{dist.get_rank()}.pt")

cfg = get_profile("smoke").config("kd", seed=0)
run(cfg, options=EngineOptions(device="cpu", progress=False, on_end=dump), root=out / "cache")
"""


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Teacher (vanilla, also trained under torchrun) and student: every rank dumped its final student.
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    records = sorted((tmp_path / "cache" / "runs").glob("*/record.json"))
    assert [p.parent.name.split("-")[0] for p in records] == ["kd", "vanilla"]  # one record per run, not per rank
    import json

    rec = json.loads(next(p for p in records if p.parent.name.startswith("kd")).read_text())
    assert rec["world_size"] == 2
