"""Run identity, the run store and up-front refusal of bad input (issue: run identity you can trust)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kdlib import KDLibError
from kdlib.cli import main
from kdlib.config import DataConfig
from kdlib.data.loaders import TensorBatches, train_count
from kdlib.distill import create_distiller, distiller_class, register_distiller, resolve_options
from kdlib.distill.kd import KD
from kdlib.distill.options import option
from kdlib.models import create_model
from kdlib.profiles import get_profile
from kdlib.run_store import config_hash, identity, results_root, run_dir, write_json_atomic
from kdlib.train import EngineOptions, run

REPO = Path(__file__).resolve().parent.parent
SMOKE = get_profile("smoke")


# --- identity ---------------------------------------------------------------------------------------
def test_an_explicit_default_is_the_same_run_as_an_implicit_one():
    implicit, explicit = SMOKE.config("kd"), SMOKE.config("kd", tau=4.0)
    assert config_hash(implicit) == config_hash(explicit)
    assert config_hash(SMOKE.config("kd", tau=4)) == config_hash(implicit)  # an int for a float option
    assert config_hash(SMOKE.config("kd", tau=2.0)) != config_hash(implicit)
    # Also for a config written by hand with no options at all.
    assert config_hash(implicit.replace(method_options=())) == config_hash(implicit)


def test_a_changed_default_is_a_new_run(monkeypatch):
    before = config_hash(SMOKE.config("kd"))

    @dataclasses.dataclass(frozen=True)
    class Tau1(KD.Options):
        tau: float = option(1.0, "τ changed", low=0, low_open=True)

    monkeypatch.setattr(KD, "Options", Tau1)
    after = SMOKE.config("kd")
    assert dict(after.method_options)["tau"] == 1.0
    assert config_hash(after) != before
    # A hand-written config without options resolves to the new default too.
    assert config_hash(after.replace(method_options=())) == config_hash(after)


def test_a_method_version_bump_is_a_new_run(monkeypatch):
    before = config_hash(SMOKE.config("kd"))
    monkeypatch.setattr(KD, "version", KD.version + 1)
    assert config_hash(SMOKE.config("kd")) != before
    assert identity(SMOKE.config("kd"))["versions"]["method"] == KD.version


def test_the_dataset_recipe_version_is_part_of_the_identity(monkeypatch):
    import kdlib.data.shapes as shapes

    before = config_hash(SMOKE.config("vanilla"))
    monkeypatch.setattr(shapes, "DATASET_VERSION", shapes.DATASET_VERSION + 1)
    assert config_hash(SMOKE.config("vanilla")) != before


@pytest.mark.parametrize("change", [{"root": "/elsewhere"}, {"download": True}, {"num_workers": 7}])
def test_fields_that_only_say_where_data_comes_from_keep_the_run(change):
    cfg = SMOKE.config("kd")
    data = dataclasses.replace(cfg.data, **change)
    moved = cfg.replace(data=data, teacher=cfg.teacher.replace(data=data), profile="renamed")
    assert config_hash(moved) == config_hash(cfg)
    # ... while a field that changes the data does change it.
    bigger = dataclasses.replace(cfg.data, train_size=cfg.data.train_size + 64)
    assert config_hash(cfg.replace(data=bigger)) != config_hash(cfg)


def test_the_teacher_is_part_of_the_identity():
    cfg = SMOKE.config("kd")
    other = cfg.replace(teacher=cfg.teacher.replace(seed=cfg.teacher.seed + 1))
    assert config_hash(other) != config_hash(cfg)


def test_profile_configs_hold_every_option_resolved():
    opts = dict(SMOKE.config("lakd").method_options)
    assert opts == resolve_options("lakd") and opts["beta"] == distiller_class("lakd").Options().beta
    aft = dict(SMOKE.config("aftkd", lambdas={"feat": 100}).method_options)["lambdas"]
    assert aft["feat"] == 100.0 and aft["att"] == 1000.0  # a partial dict is completed


def test_the_record_of_a_lakd_run_holds_its_beta(tmp_path):
    cfg = SMOKE.config("lakd")
    rec = run(cfg, options=EngineOptions(device="cpu", precision="fp32", progress=False), root=tmp_path)
    beta = distiller_class("lakd").Options().beta
    assert rec["config"]["method_options"]["beta"] == beta
    assert rec["identity"]["method_options"]["beta"] == beta
    assert rec["identity"]["versions"] == {"method": 1, "dataset": identity(cfg)["versions"]["dataset"]}
    stored = json.loads((run_dir(cfg, tmp_path) / "record.json").read_text())
    assert stored["config"]["method_options"]["beta"] == beta


# --- options as data --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options,needle",
    [
        ("kd", {"tau": "abc"}, "tau='abc' has the wrong type"),
        ("kd", {"tau": 0.0}, "out of range"),
        ("kd", {"tau": True}, "wrong type"),
        ("kd", {"temperature": 2}, "unknown option(s) ['temperature']"),
        ("sakd", {"p": 1.0}, "p=1.0 is out of range"),
        ("sakd", {"dropout_form": "zero"}, "choose one of 'inverted', 'renorm', 'dropkey'"),
        ("lakd", {"curriculum": 1.5}, "wrong type"),
        ("lakd", {"memory_saving": True, "truncate": False}, "needs truncate=True"),
        ("aftkd", {"lambdas": {"nope": 1.0}}, "unknown lambdas ['nope']"),
        ("sam_kd", {"beta": "manual"}, "not allowed"),
        ("sam_kd", {"beta": -1.0}, "out of range"),
    ],
)
def test_bad_options_are_refused_before_anything_is_built(method, options, needle):
    with pytest.raises(KDLibError) as err:
        SMOKE.config(method, **options)
    assert needle in str(err.value)


def test_every_option_is_declared_with_a_meaning():
    for name in ("afd", "aftkd", "at", "fitnets", "kd", "lakd", "sakd", "sam_kd"):
        rows = distiller_class(name).Options.describe()
        assert rows and all(r["meaning"] for r in rows), name
        assert {r["name"] for r in rows} == set(resolve_options(name))


def test_reregistering_a_name_is_refused():
    with pytest.raises(KDLibError, match="'kd' is registered already"):
        register_distiller("kd")(type("Again", (KD,), {}))


def test_trainable_state_of_another_shape_is_a_clear_error():
    s8, t8 = create_model("resnet8"), create_model("resnet8")
    a = create_distiller("aftkd", s8, t8)
    b = create_distiller("aftkd", create_model("resnet8x4"), create_model("resnet8x4"))
    with pytest.raises(KDLibError, match="checkpoint does not match method 'aftkd'.*size mismatch"):
        a.load_trainable_state_dict(b.trainable_state_dict())


# --- the CLI refuses bad input up front --------------------------------------------------------------
def _cli(args, cache: Path, capsys):
    os.environ["KDLIB_CACHE"] = str(cache)
    try:
        rc = main(["train", "--profile", "smoke", *args])
    finally:
        os.environ.pop("KDLIB_CACHE")
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "kd", "-o", "tau=abc"], "tau='abc' has the wrong type"),
        (["--method", "kd", "--epochs", "0"], "epochs must be a whole number >= 1, got 0"),
        (["--method", "kd", "--epochs", "-3"], "got -3"),
        (["--method", "kd", "--epochs", "abc"], "invalid int value"),
        (["--method", "kd", "--device", "tpu"], "device"),
        (["--method", "kd", "--precision", "fp8"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_in_one_line_with_no_run_folder(args, needle, tmp_path, capsys):
    try:
        rc, err = _cli(args, tmp_path, capsys)
    except SystemExit as e:  # argparse's own refusals exit from inside main
        rc, err = e.code, capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0]
    assert not (tmp_path / "runs").exists(), "something was trained or created before the refusal"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_on_a_cpu_machine_exits_2_before_training(tmp_path, capsys):
    rc, err = _cli(["--method", "kd", "--device", "cuda"], tmp_path, capsys)
    assert rc == 2 and "no CUDA GPU is available" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# --- data: a last training batch of one image ------------------------------------------------------
def test_a_last_training_batch_of_one_is_dropped_and_every_test_image_kept():
    assert train_count(129, 64) == 128 and train_count(128, 64) == 128 and train_count(130, 64) == 130
    images, labels = torch.zeros(129, 3, 32, 32, dtype=torch.uint8), torch.arange(129) % 10
    train = TensorBatches(images, labels, 64, (0.5,) * 3, (0.25,) * 3, train=True)
    test = TensorBatches(images, labels, 64, (0.5,) * 3, (0.25,) * 3, train=False)
    assert [len(y) for _, y in train] == [64, 64] and len(train) == 2
    assert [len(y) for _, y in test] == [64, 64, 1] and len(test) == 3


def test_sakd_trains_when_the_dataset_leaves_one_image_over(tmp_path):
    data = DataConfig(name="shapes", batch_size=32, train_size=65, test_size=33)
    cfg = SMOKE.config("sakd").replace(data=data)
    cfg = cfg.replace(teacher=cfg.teacher.replace(data=data, optim=dataclasses.replace(cfg.teacher.optim, epochs=1)))
    rec = run(cfg, options=EngineOptions(device="cpu", precision="fp32", progress=False), root=tmp_path)
    assert rec["status"] == "complete"


# --- on_end, atomic writes, locks ------------------------------------------------------------------
def test_on_end_fires_only_for_the_run_asked_for(tmp_path):
    seen = []
    options = EngineOptions(device="cpu", precision="fp32", progress=False, on_end=lambda d: seen.append(d.method_name))
    run(SMOKE.config("kd"), options=options, root=tmp_path)
    assert seen == ["kd"]  # the teacher (a vanilla run) trained first, without calling it


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    for i in range(3):
        write_json_atomic(tmp_path / "r.json", {"i": i})
    assert json.loads((tmp_path / "r.json").read_text()) == {"i": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


TRAIN_ONE = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from kdlib.profiles import get_profile
from kdlib.train import EngineOptions, run
import kdlib.train as train
fit = train._fit
def counted(*a, **k):
    Path(sys.argv[2]).joinpath(f"trained-{a[0].method}-{__import__('os').getpid()}").touch()
    return fit(*a, **k)
train._fit = counted
rec = run(get_profile("smoke").config("kd"), options=EngineOptions(device="cpu", progress=False),
          root=Path(sys.argv[1]))
print(rec["hash"])
"""


@pytest.mark.slow
def test_two_processes_asking_for_one_run_train_it_once(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", TRAIN_ONE, str(tmp_path / "cache"), str(marks)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]  # the same record
    trained = sorted(p.name.rsplit("-", 1)[0] for p in marks.iterdir())
    assert trained == ["trained-kd", "trained-vanilla"], trained  # student and teacher, once each


# --- where results go ------------------------------------------------------------------------------
def test_results_root_follows_the_environment_and_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("KDLIB_RESULTS", str(tmp_path / "mine"))
    assert results_root() == tmp_path / "mine"
    monkeypatch.delenv("KDLIB_RESULTS")
    assert results_root() == REPO / "results"  # the tests run from the checkout


@pytest.mark.slow
def test_a_non_editable_install_writes_nothing_under_site_packages(tmp_path):
    wheels, target, home = tmp_path / "wheels", tmp_path / "site", tmp_path / "home"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, timeout=300)
    wheel = next(wheels.glob("kdlib-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)  # what pip install --target does for a pure-Python wheel
    before = {p for p in target.rglob("*") if "__pycache__" not in p.parts}
    env = {k: v for k, v in os.environ.items() if k not in ("KDLIB_RESULTS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), HOME=str(home), KDLIB_CACHE=str(tmp_path / "cache"), XDG_DATA_HOME="")
    code = ("import kdlib, kdlib.run_store as s; print(kdlib.__file__); print(s.results_root());"
            "from kdlib.cli import main; raise SystemExit(main(['train', '--profile', 'smoke', '--method', 'vanilla',"
            "'--epochs', '1', '--quiet', '--export']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, root = proc.stdout.splitlines()[:2]
    assert module.startswith(str(target))
    assert Path(root) == home / ".local" / "share" / "kdlib" / "results"
    assert list((Path(root) / "smoke").glob("vanilla-*.json")), "the export went somewhere else"
    after = {p for p in target.rglob("*") if "__pycache__" not in p.parts}
    assert after == before, sorted(map(str, after - before))


# --- scoring: weight average, evaluation cadence, validation split ---------------------------------
def _scoring_cfg(**optim):
    data = DataConfig(name="shapes", batch_size=32, train_size=96, test_size=64)
    cfg = SMOKE.config("vanilla").replace(data=data)
    return cfg.replace(optim=dataclasses.replace(cfg.optim, epochs=3, **optim))


def test_the_weight_average_is_what_the_record_scores_and_saves(tmp_path):
    from kdlib.data import get_loaders
    from kdlib.epoch import evaluate
    from kdlib.train import load_model

    options = EngineOptions(device="cpu", precision="fp32", progress=False)
    cfg = _scoring_cfg(ema_decay=0.9)
    rec = run(cfg, options=options, root=tmp_path)
    assert all("test_acc_raw" in h for h in rec["history"]) and "top1_last_raw" in rec
    model = load_model(cfg, root=tmp_path)  # student.pt holds the averaged weights
    assert evaluate(model, get_loaders(cfg.data, seed=cfg.seed).test) == rec["top1_last"]
    plain = run(_scoring_cfg(), options=options, root=tmp_path)
    assert plain["history"][-1]["test_acc"] == rec["top1_last_raw"]  # same training, only the scoring differs
    assert config_hash(cfg) != config_hash(_scoring_cfg())


def test_eval_every_scores_some_epochs_and_always_the_last(tmp_path):
    rec = run(_scoring_cfg(eval_every=2), options=EngineOptions(device="cpu", precision="fp32", progress=False),
              root=tmp_path)
    assert ["test_acc" in h for h in rec["history"]] == [False, True, True]
    assert rec["best_epoch"] in (2, 3)


def test_the_validation_split_is_another_stream_of_images():
    from kdlib.data import get_loaders

    data = DataConfig(name="shapes", batch_size=32, train_size=32, test_size=32)
    test = next(iter(get_loaders(data).test))[0]
    val = next(iter(get_loaders(dataclasses.replace(data, eval_split="val")).test))[0]
    assert test.shape == val.shape and not torch.equal(test, val)
    with pytest.raises(KDLibError, match="eval_split must be 'test' or 'val'"):
        get_loaders(dataclasses.replace(data, eval_split="train"))


def test_at_and_fitnets_with_kd_carry_the_logit_terms_of_the_attention_methods(tiny_pair, batch):
    from kdlib.distill.kd import kd_loss

    student, teacher = tiny_pair
    x, y = batch
    for name in ("at", "fitnets"):
        torch.manual_seed(0)
        plain = create_distiller(name, student, teacher)
        torch.manual_seed(0)  # the same regressor initialisation for FitNets
        with_kd = create_distiller(f"{name}_kd", student, teacher)
        _, a = plain.forward_train(x, y)
        _, b = with_kd.forward_train(x, y)
        assert set(b) == set(a) | {"kd"}
        for k in a:
            torch.testing.assert_close(b[k], a[k])  # the method's own terms are unchanged
        torch.testing.assert_close(b["kd"], 0.9 * kd_loss(student(x), teacher(x), 4.0))
        assert resolve_options(f"{name}_kd") == {**resolve_options(name), "kd_weight": 0.9, "tau": 4.0}
