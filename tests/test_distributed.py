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


DIVERGE_SCRIPT = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kdlib.distill.base import Distiller
from kdlib.distill.registry import register_distiller
from kdlib.profiles import get_profile
from kdlib.train import EngineOptions, run


@register_distiller("nan_on_rank1")
class NaNOnRankOne(Distiller):
    # The student alone, plus a term that turns NaN on rank 1 only, from its third step.
    needs_teacher = False

    def __init__(self, student, teacher=None):
        super().__init__(student, None)
        self.calls = 0

    def forward_train(self, x, y):
        self.calls += 1
        logits = self.student(x)
        bad = dist.get_rank() == 1 and self.calls > 2
        aux = torch.tensor(float("nan") if bad else 0.0) + 0 * logits.sum()
        return logits, {"ce": F.cross_entropy(logits, y), "aux": aux}


cfg = get_profile("smoke").config("vanilla", seed=0).replace(method="nan_on_rank1")
run(cfg, options=EngineOptions(device="cpu", progress=False), root=Path(sys.argv[1]) / "cache")
"""


@pytest.mark.slow
def test_torchrun_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # Without the all-reduced NaN flag, rank 1 would raise while rank 0 waited forever in DDP's
    # gradient all-reduce: the timeout below would fire instead of both processes exiting.
    script = tmp_path / "diverge_ddp.py"
    script.write_text(DIVERGE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode != 0
    assert "loss term 'aux' is nan at step 2" in proc.stderr  # rank 1 names its term
    assert "a loss term is not finite on another process at step 2" in proc.stderr  # rank 0, same step
    import json

    records = sorted((tmp_path / "cache" / "runs").glob("*/record.json"))
    assert len(records) == 1  # one record, written once
    rec = json.loads(records[0].read_text())
    assert rec["status"] == "diverged" and rec["world_size"] == 2 and rec["top1_last"] is None
