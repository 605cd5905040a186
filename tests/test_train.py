"""The engine: schedules, records and the cache, resume after SIGKILL, NaN stops, checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kdlib import KDLibError
from kdlib.config import DataConfig, OptimConfig, RunConfig
from kdlib.distill import Distiller, NonFiniteLossError, register_distiller
from kdlib.distill.options import MethodOptions, option
from kdlib.run_store import CHECKPOINT, config_hash, find_record, load_checkpoint, run_dir
from kdlib.train import EngineOptions, load_model, lr_factor, run

TINY_DATA = DataConfig(name="shapes", batch_size=32, train_size=96, test_size=64)
TINY_OPTIM = OptimConfig(epochs=3, lr=0.05, schedule="cosine", warmup_frac=0.1, nesterov=True)
QUIET = EngineOptions(device="cpu", precision="fp32", progress=False)  # tiny nets: fp32 is the faster here


def tiny_cfg(method="vanilla", seed=0, **options) -> RunConfig:
    teacher = None
    if method != "vanilla":
        teacher = RunConfig(student="resnet8", data=TINY_DATA, optim=TINY_OPTIM.__class__(epochs=2), seed=0)
    cfg = RunConfig(student="resnet8", method=method, teacher=teacher, data=TINY_DATA, optim=TINY_OPTIM, seed=seed)
    return cfg.with_options(**options) if options else cfg


def test_lr_schedules():
    multi = OptimConfig(epochs=240, lr=0.05, schedule="multistep", milestones=(150, 180, 210))
    assert lr_factor(multi, 149 * 10, 10) == 1.0
    assert lr_factor(multi, 150 * 10, 10) == pytest.approx(0.1)
    assert lr_factor(multi, 239 * 10, 10) == pytest.approx(1e-3)
    cos = OptimConfig(epochs=10, schedule="cosine", warmup_frac=0.1)
    assert lr_factor(cos, 0, 10) == pytest.approx(0.1)  # warm-up: 10 steps, step 0 -> 1/10
    assert lr_factor(cos, 9, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 55, 10) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(KDLibError, match="unknown schedule"):
        lr_factor(OptimConfig(schedule="step"), 0, 1)


def test_run_writes_a_complete_record_and_is_cached(tmp_path, monkeypatch):
    cfg = tiny_cfg("kd")
    rec = run(cfg, options=QUIET, root=tmp_path)
    assert rec["status"] == "complete" and rec["hash"] == config_hash(cfg)
    assert len(rec["history"]) == 3
    assert set(rec["history"][0]["losses"]) == {"ce", "kd"}
    assert rec["top1_best"] >= rec["top1_last"]
    assert rec["config"]["teacher"]["student"] == "resnet8"
    assert {"kdlib", "torch", "torchvision", "python"} <= set(rec["versions"])
    assert rec["device"].startswith("cpu") and rec["wall_time_s"] > 0
    # The teacher was trained by the same engine and cached.
    assert find_record(cfg.teacher, tmp_path) is not None
    # A second call returns the record without training.
    monkeypatch.setattr("kdlib.train._fit", lambda *a, **k: pytest.fail("trained a cached run again"))
    assert run(cfg, options=QUIET, root=tmp_path) == rec
    model = load_model(cfg, root=tmp_path)
    assert not model.training


def test_same_seed_same_result_other_seed_differs(tmp_path):
    a = run(tiny_cfg(seed=0), options=QUIET, root=tmp_path / "a")
    b = run(tiny_cfg(seed=0), options=QUIET, root=tmp_path / "b")
    c = run(tiny_cfg(seed=1), options=QUIET, root=tmp_path / "c")
    strip = lambda r: [{k: v for k, v in h.items() if k != "time_s"} for h in r["history"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


@register_distiller("test_nan")
class _NaNAfterTwoSteps(Distiller):
    needs_teacher = False

    @dataclass(frozen=True)
    class Options(MethodOptions):
        after: int = option(2, "steps before the loss turns NaN", low=0)

    def __init__(self, student, teacher=None, **options):
        super().__init__(student, None, **options)
        self.calls, self.after = 0, self.options.after

    def forward_train(self, x, y):
        self.calls += 1
        logits = self.student(x)
        bad = torch.tensor(float("nan")) if self.calls > self.after else torch.tensor(0.0)
        return logits, {"ce": torch.nn.functional.cross_entropy(logits, y), "aux": bad + 0 * logits.sum()}


def test_nan_loss_stops_the_run_naming_term_and_step(tmp_path):
    with pytest.raises(KDLibError, match=r"loss term 'aux' is nan at step 2 \(epoch 1 of run "):
        run(tiny_cfg("test_nan"), options=QUIET, root=tmp_path)


def test_a_diverged_run_is_recorded_and_not_trained_again(tmp_path, monkeypatch):
    cfg = tiny_cfg("test_nan")
    with pytest.raises(NonFiniteLossError) as first:
        run(cfg, options=QUIET, root=tmp_path)
    rec = first.value.record
    assert rec["status"] == "diverged" and rec["diverged_epoch"] == 1 and rec["history"] == []
    assert "'aux' is nan at step 2" in rec["error"] and rec["top1_last"] is None
    assert find_record(cfg, tmp_path) is None  # not a complete run ...
    assert find_record(cfg, tmp_path, status="diverged") == rec  # ... but a stored result
    # Asking again answers from the record at once, naming the folder to delete for a retry.
    monkeypatch.setattr("kdlib.train._fit", lambda *a, **k: pytest.fail("trained a diverged run again"))
    with pytest.raises(NonFiniteLossError, match=r"diverged before \(cpu.*fp32\): .*delete that folder") as again:
        run(cfg, options=QUIET, root=tmp_path)
    assert again.value.record == rec


def test_divergence_after_an_epoch_keeps_its_history_and_checkpoint(tmp_path):
    cfg = tiny_cfg("test_nan", after=4)  # 3 steps per epoch: steps 0-3 finite, step 4 (epoch 2) NaN
    with pytest.raises(NonFiniteLossError, match=r"'aux' is nan at step 4 \(epoch 2 of run ") as err:
        run(cfg, options=QUIET, root=tmp_path)
    rec = err.value.record
    assert rec["diverged_epoch"] == 2 and [h["epoch"] for h in rec["history"]] == [1]
    assert rec["precision"] == "fp32" and rec["world_size"] == 1
    ckpt = load_checkpoint(run_dir(cfg, tmp_path) / CHECKPOINT, config_hash(cfg))
    assert ckpt["epoch"] == 1  # the state at the end of the last finite epoch stays readable


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    cfg = tiny_cfg()
    run(cfg.replace(optim=TINY_OPTIM.__class__(epochs=1)), options=QUIET, root=tmp_path)
    folder = run_dir(cfg, tmp_path)
    folder.mkdir(parents=True)
    (folder / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(KDLibError, match="corrupt"):
        run(cfg, options=QUIET, root=tmp_path)
    other = run_dir(cfg.replace(optim=TINY_OPTIM.__class__(epochs=1)), tmp_path) / CHECKPOINT
    (folder / CHECKPOINT).write_bytes(other.read_bytes())
    with pytest.raises(KDLibError, match="another config"):
        load_checkpoint(folder / CHECKPOINT, config_hash(cfg))


def _same(a, b) -> bool:
    """Exactly equal, through the dicts and lists of a state (AFT-KD's weighting keeps its history)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _final_state(folder: Path) -> dict:
    return torch.load(folder / "student.pt", weights_only=True)


# The stateful methods: AFT-KD's loss weights (an epoch-level state), SAKD's dropout draws (the RNG),
# LAKD's curriculum (epochs done, a buffer) — each must resume exactly where it stopped.
RESUMED = {
    "kd": {},
    "aftkd": {},
    "sakd": {"p": 0.3},
    "lakd": {"curriculum": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RESUMED))
def test_sigkill_then_resume_gives_the_same_weights_and_metrics(tmp_path, method):
    """Kill a training subprocess mid-run, resume it, compare with an uninterrupted run."""
    # Same thread count as this process (conftest: 1): CPU float reductions depend on it.
    script = (
        "import sys, torch; from pathlib import Path; sys.path.insert(0, sys.argv[2]); torch.set_num_threads(1);"
        "from test_train import long_cfg, QUIET, run;"
        "run(long_cfg(sys.argv[3]), options=QUIET, root=Path(sys.argv[1]))"
    )
    cfg = long_cfg(method)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}

    killed = tmp_path / "killed"
    run(cfg.teacher, options=QUIET, root=killed)  # the teacher first: the kill must land in the student's run
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed), str(Path(__file__).parent), method], env=env)
    ckpt = run_dir(cfg, killed) / CHECKPOINT
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir(cfg, killed) / "record.json").exists()
    assert 2 <= torch.load(ckpt, weights_only=True)["epoch"] < cfg.optim.epochs

    resumed = run(cfg, options=QUIET, root=killed)
    straight = run(cfg, options=QUIET, root=tmp_path / "straight")
    a, b = _final_state(run_dir(cfg, killed)), _final_state(run_dir(cfg, tmp_path / "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The method's own state too (AFT-KD's weights, LAKD's epochs_done, adapters, attention heads).
    sa = torch.load(run_dir(cfg, killed) / CHECKPOINT, weights_only=True)["distiller"]
    sb = torch.load(run_dir(cfg, tmp_path / "straight") / CHECKPOINT, weights_only=True)["distiller"]
    assert _same(sa, sb)
    strip = lambda r: [{k: v for k, v in h.items() if k != "time_s"} for h in r["history"]]  # noqa: E731
    assert strip(resumed) == strip(straight)
    assert resumed["top1_last"] == straight["top1_last"]
    json.dumps(resumed)  # the record is plain JSON


def test_resuming_at_another_precision_is_refused(tmp_path):
    cfg = tiny_cfg()
    short = cfg.replace(optim=TINY_OPTIM.__class__(epochs=1))
    run(short, options=QUIET, root=tmp_path)
    # Pretend the 3-epoch run was interrupted after epoch 1, at fp32 (the checkpoint of the 1-epoch run).
    ckpt = torch.load(run_dir(short, tmp_path) / CHECKPOINT, weights_only=True)
    ckpt["config_hash"] = config_hash(cfg)
    run_dir(cfg, tmp_path).mkdir(parents=True)
    torch.save(ckpt, run_dir(cfg, tmp_path) / CHECKPOINT)
    with pytest.raises(KDLibError, match=r"written at fp32.*resume with precision='fp32'"):
        run(cfg, options=EngineOptions(device="cpu", precision="bf16", progress=False), root=tmp_path)


def long_cfg(method: str = "kd") -> RunConfig:
    cfg = tiny_cfg(method, **RESUMED[method])
    return cfg.replace(optim=cfg.optim.__class__(**{**cfg.optim.__dict__, "epochs": 6}))
