"""The speed benchmark (benchmarks/bench_speed.py), run in --quick mode on the CPU so it cannot rot.

One run (resnet8 -> resnet8, batches 8 and 16, a few steps) feeds the record checks; the ratio and
verdict logic is also pinned on hand-made measurements with hand-computed values.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import kdlib
from kdlib import KDLibError
from kdlib.data.cifar import CIFAR100_MEAN, CIFAR100_STD, crd_transform
from kdlib.distill import create_distiller
from kdlib.profiles import PROFILE_TABLE

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_speed.py"


def _load_bench():
    # benchmarks/ is not a package; register the module so dataclasses can resolve it.
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
BATCHES = (8, 16)
QUICK_ARGS = ["--quick", "--device", "cpu", "--pair", "resnet8", "resnet8", "--profile",
              "--batch-sizes", *map(str, BATCHES), "--samples", "64", "--timed-samples", "24",
              "--distill-steps", "1"]
LOOPS = ("reference", "engine", "bound")


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def _run_bench(args: list[str], folder: Path, name: str) -> dict:
    """Run the benchmark into ``folder``; the record as written, and whether the repository was left alone."""
    out, figure = folder / f"{name}.json", folder / f"{name}.png"
    watched = [REPO / "results", REPO / "book" / "_static"]
    before = [_tree(f) for f in watched]
    returned = bench.main([*args, "--out", str(out), "--figure", str(figure)])
    after = [_tree(f) for f in watched]
    record = json.loads(out.read_text())  # the checks read what a reader of the record reads
    return {"record": record, "returned": returned, "figure": figure, "repo_untouched": before == after}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _run_bench(QUICK_ARGS, tmp_path_factory.mktemp("speed"), "speed")


# --- the quick run ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_record_has_every_section_and_is_on_disk(quick_run):
    record = quick_run["record"]
    assert record == json.loads(json.dumps(quick_run["returned"]))
    for key in ("device", "device_kind", "versions", "settings", "measurements", "ratios", "targets",
                "profile_summary"):
        assert key in record, key
    assert record["device"].startswith("cpu") and record["device_kind"] == "cpu"
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["torchvision"] == torchvision.__version__
    assert record["versions"]["kdlib"] == kdlib.__version__
    s = record["settings"]
    assert (s["teacher"], s["student"], s["quick"]) == ("resnet8", "resnet8", True)
    assert s["batch_sizes"] == list(BATCHES)
    assert s["workers"] == 0 and s["threads"] == 1
    assert s["loops"]["reference"]["precision"] == "fp32" and s["loops"]["engine"]["channels_last"]
    assert set(record["measurements"]) == {*LOOPS, "distillers"}
    assert quick_run["repo_untouched"], "a quick run wrote into results/ or book/_static/"


@pytest.mark.slow
def test_throughputs_are_positive_and_follow_from_the_timings(quick_run):
    m, s = quick_run["record"]["measurements"], quick_run["record"]["settings"]
    rows = [(loop, b, m[loop][str(b)], s["loops"]["timed_steps"][str(b)]) for loop in LOOPS for b in BATCHES]
    rows += [(f"distiller {k}", b, row, s["distill_steps"])
             for b in BATCHES for k, row in m["distillers"][str(b)].items()]
    for name, batch, row, steps in rows:
        assert row["seconds"] > 0 and row["images_per_s"] > 0, name
        assert row["steps"] == steps and row["samples"] == steps * batch, name
        assert row["images_per_s"] == pytest.approx(row["samples"] / row["seconds"], rel=1e-12), name
        assert row["step_s"] == pytest.approx(row["seconds"] / row["steps"], rel=1e-12), name
    assert s["loops"]["timed_steps"] == {"8": 3, "16": 3}  # max(3, ceil(24 / batch))
    for b in BATCHES:
        dist = m["distillers"][str(b)]
        assert list(dist) == list(bench.METHODS)
        for method, row in dist.items():
            assert row["peak_memory"]["bytes"] > 0, method
            assert row["peak_memory"]["device"] == "cpu"


@pytest.mark.slow
def test_ratios_are_computed_from_the_measurements(quick_run):
    record = quick_run["record"]
    m, r = record["measurements"], record["ratios"]
    for b in map(str, BATCHES):
        ref, eng, bound = (m[k][b]["images_per_s"] for k in LOOPS)
        assert r["engine_over_reference"][b] == pytest.approx(eng / ref)
        assert r["engine_over_bound"][b] == pytest.approx(eng / bound)
        kd = m["distillers"][b]["kd"]
        for method, row in m["distillers"][b].items():
            assert r["step_time_over_kd"][b][method] == pytest.approx(row["step_s"] / kd["step_s"])
            mem = row["peak_memory"]["bytes"] / kd["peak_memory"]["bytes"]
            assert r["peak_memory_over_kd"][b][method] == pytest.approx(mem)
        assert r["step_time_over_kd"][b]["kd"] == 1.0


@pytest.mark.slow
def test_targets_are_judged_on_the_ratios(quick_run):
    record = quick_run["record"]
    r, targets = record["ratios"], {t["name"]: t for t in record["targets"]}
    assert set(targets) == {"engine_vs_reference_small", "engine_vs_reference_large", "engine_vs_bound_large",
                            "attention_vs_kd_8", "attention_vs_kd_16"}
    small, large = targets["engine_vs_reference_small"], targets["engine_vs_reference_large"]
    assert (small["batch_size"], small["issue_batch_size"], small["threshold"]) == (8, 64, 3.0)
    assert (large["batch_size"], large["issue_batch_size"], large["threshold"]) == (16, 512, 5.0)
    assert small["value"] == r["engine_over_reference"]["8"]
    assert large["value"] == r["engine_over_reference"]["16"]
    assert targets["engine_vs_bound_large"]["value"] == r["engine_over_bound"]["16"]
    for b in ("8", "16"):
        t = targets[f"attention_vs_kd_{b}"]
        attention = {k: v for k, v in r["step_time_over_kd"][b].items() if k in bench.ATTENTION_METHODS}
        assert t["value"] == max(attention.values()) and attention[t["worst_method"]] == t["value"]
    for t in targets.values():
        expected = t["value"] >= t["threshold"] if t["comparison"] == ">=" else t["value"] <= t["threshold"]
        assert t["met"] is expected, t["name"]
    report = bench.report(record)
    assert report.count("] ") == len(targets) and "stated for batch 512" in report


@pytest.mark.slow
def test_profile_summary_lists_the_engine_ops(quick_run):
    summaries = quick_run["record"]["profile_summary"]
    assert set(summaries) == {"8", "16"}
    for b, text in summaries.items():
        assert text.startswith(f"KD engine, batch {b}") and "self_cpu_time_total" in text
        assert "aten::" in text and "convolution" in text


@pytest.mark.slow
def test_figure_is_written(quick_run):
    figure = quick_run["figure"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(figure) as img:
        assert img.width > 800 and img.height > 300  # two panels, 12 × 4.2 in at 120 dpi


# --- pieces, without running the benchmark ---------------------------------------------------------
def _row(images_per_s=None, step_s=None, peak=None, batch=64):
    steps = 10
    if step_s is None:
        step_s = batch / images_per_s
    row = {"steps": steps, "samples": steps * batch, "seconds": step_s * steps,
           "images_per_s": batch / step_s, "step_s": step_s}
    if peak is not None:
        row["peak_memory"] = {"bytes": peak}
    return row


def test_ratios_and_verdicts_on_hand_made_measurements():
    m = {
        "reference": {"64": _row(1000.0), "512": _row(2000.0, batch=512)},
        "engine": {"64": _row(3500.0), "512": _row(10000.0, batch=512)},
        "bound": {"64": _row(4000.0), "512": _row(12500.0, batch=512)},
        "distillers": {"64": {"kd": _row(step_s=0.1, peak=200), "vanilla": _row(step_s=0.05, peak=100),
                              "at": _row(step_s=0.12, peak=260), "afd": _row(step_s=0.16, peak=300)}},
    }
    r = bench.compute_ratios(m)
    # Hand-computed: 3500/1000, 10000/2000, 10000/12500; 0.12/0.1, 0.16/0.1; 260/200, 300/200.
    assert r["engine_over_reference"] == pytest.approx({"64": 3.5, "512": 5.0})
    assert r["engine_over_bound"] == pytest.approx({"64": 0.875, "512": 0.8})
    assert r["step_time_over_kd"]["64"] == pytest.approx({"kd": 1.0, "vanilla": 0.5, "at": 1.2, "afd": 1.6})
    assert r["peak_memory_over_kd"]["64"] == pytest.approx({"kd": 1.0, "vanilla": 0.5, "at": 1.3, "afd": 1.5})
    t = {x["name"]: x for x in bench.verdicts(r, (64, 512))}
    assert t["engine_vs_reference_small"]["met"] is True  # 3.5 >= 3
    assert t["engine_vs_reference_large"]["met"] is True  # 5.0 >= 5: the boundary counts as met
    assert t["engine_vs_bound_large"]["met"] is False  # 0.8 < 0.85
    assert t["attention_vs_kd_64"]["met"] is False and t["attention_vs_kd_64"]["worst_method"] == "afd"
    assert t["attention_vs_kd_64"]["value"] == pytest.approx(1.6)
    assert t["engine_vs_reference_large"]["issue_batch_size"] == t["engine_vs_reference_large"]["batch_size"]


def test_reference_loss_is_the_kd_distillers_loss(tiny_pair, batch):
    student, teacher = tiny_pair
    x, y = batch
    torch.manual_seed(0)
    _, terms = create_distiller("kd", student, teacher).train().forward_train(x, y)
    logits = student(x)
    with torch.no_grad():
        t_logits = teacher(x)
    ours = bench.reference_kd_loss(logits, t_logits, y).item()
    assert ours == pytest.approx(sum(terms.values()).item(), rel=1e-6)


def test_reference_transform_is_crds():
    image = Image.fromarray(bench.random_cifar(1, seed=3)[0][0])
    torch.manual_seed(7)
    ours = bench.reference_transform()(image)
    torch.manual_seed(7)
    crd = crd_transform(CIFAR100_MEAN, CIFAR100_STD, train=True)(image)
    assert ours.shape == (3, 32, 32) and torch.equal(ours, crd)


def test_topk_correct_counts_like_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(12, 100, generator=g), torch.randint(0, 100, (12,), generator=g)
    y[:3] = logits[:3].argmax(1)  # at least three top-1 hits
    top1, top5 = bench.topk_correct(logits, y)
    ranks = [(row > row[label]).sum().item() for row, label in zip(logits, y)]  # 0 = the label is the arg-max
    assert top1.item() == sum(r < 1 for r in ranks) >= 3
    assert top5.item() == sum(r < 5 for r in ranks)


def test_quick_defaults_stay_out_of_the_repository():
    args = bench.parse_args(["--quick", "--device", "cpu"])
    settings = bench.resolve_settings(args)
    out, figure = bench.output_paths(args, settings)
    for path in (out, figure):
        assert REPO not in path.resolve().parents
    assert (settings.batch_sizes, settings.workers, settings.threads) == ((16, 32), 0, 1)
    full = bench.parse_args(["--device", "cpu"])
    out, figure = bench.output_paths(full, bench.resolve_settings(full))
    # On a CPU the three loops take the second name: results/speed_cpu.json is the precision record.
    assert out == REPO / "results" / "speed_cpu_loops.json"
    assert figure == REPO / "book" / "_static" / "speed_cpu_loops.png"


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "0"], "batch size must be >= 1"),
    (["--methods", "kd", "nope"], "unknown method"),
    (["--pair", "resnet8", "resnet_nope"], "unknown model 'resnet_nope'"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--device", "mps"], "runs on cpu or cuda"),
])
def test_bad_input_is_a_kdlib_error(argv, message):
    with pytest.raises(KDLibError, match=message):
        bench.resolve_settings(bench.parse_args(["--quick", *argv]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_a_gpu_is_a_kdlib_error():
    with pytest.raises(KDLibError, match="no CUDA device"):
        bench.resolve_settings(bench.parse_args(["--quick", "--device", "cuda"]))


def test_kd_is_always_measured():
    args = bench.parse_args(["--quick", "--device", "cpu", "--methods", "at", "at"])
    settings = bench.resolve_settings(args)
    assert settings.methods == ("kd", "at")


# --- the CPU precision mode (--cpu-precision, benchmarks/speed_precision.py) ---------------------
sp = bench.speed_precision
PRECISION_ARGS = ["--cpu-precision", "--quick", "--batch-sizes", "4", "--samples", "16", "--timed-samples", "8",
                  "--rounds", "3", "--warmup", "1"]
VARIANTS = ("fp32-nchw", "fp32-channels_last", "policy")


@pytest.fixture(scope="module")
def precision_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the bf16 policy on any CPU (emulated where not native)
        mp.delenv("KDLIB_PRECISION", raising=False)
        mp.setattr("kdlib.precision.cpu_has_native_bf16", lambda: True)
        return _run_bench(PRECISION_ARGS, tmp_path_factory.mktemp("speed_cpu"), "speed_cpu")


@pytest.mark.slow
def test_precision_record_times_three_variants_in_rounds(precision_run):
    record = precision_run["record"]
    assert precision_run["repo_untouched"], "a quick run wrote into results/ or book/_static/"
    s = record["settings"]
    assert (s["teacher"], s["student"], s["batch"], s["timed_steps"], s["rounds"]) == ("resnet8", "resnet8", 4, 2, 3)
    assert s["num_classes"] == 10 and s["threads"] == 1 == record["torch_threads"]  # the book's 10 classes
    assert record["variants"] == {
        "fp32-nchw": {"precision": "fp32", "dtype": None, "channels_last": False},
        "fp32-channels_last": {"precision": "fp32", "dtype": None, "channels_last": True},
        "policy": {"precision": "bf16-autocast", "dtype": "torch.bfloat16", "channels_last": True},
    }
    assert (record["policy_variant"], record["policy_precision"]) == ("policy", "bf16-autocast")
    assert record["device"].startswith("cpu") and record["versions"]["torch"] == torch.__version__
    assert len(record["load_average"]["before"]) == 3 == len(record["load_average"]["after"])
    for name in VARIANTS:
        row = record["measurements"][name]
        assert len(row["rounds"]) == 3, name
        for r in row["rounds"]:
            assert (r["steps"], r["samples"]) == (2, 8) and r["seconds"] > 0
            assert r["images_per_s"] == pytest.approx(r["samples"] / r["seconds"], rel=1e-12)
        speeds = [r["images_per_s"] for r in row["rounds"]]
        assert row["images_per_s"] == max(speeds) and row["median_images_per_s"] == sorted(speeds)[1]


@pytest.mark.slow
def test_precision_ratios_and_target_follow_from_the_rounds(precision_run):
    record = precision_run["record"]
    m, r = record["measurements"], record["ratios"]
    base = m["fp32-nchw"]
    for name in VARIANTS:
        assert r["over_fp32_nchw"][name] == pytest.approx(m[name]["images_per_s"] / base["images_per_s"])
        assert r["over_fp32_nchw_median"][name] == pytest.approx(
            m[name]["median_images_per_s"] / base["median_images_per_s"])
    per_round = [p["images_per_s"] / b["images_per_s"] for p, b in zip(m["policy"]["rounds"], base["rounds"])]
    assert r["policy_over_fp32_nchw_per_round"] == pytest.approx(per_round)
    (target,) = record["targets"]
    assert target["value"] == r["over_fp32_nchw"]["policy"] and target["threshold"] == 1.8
    assert target["met"] is (target["value"] >= 1.8)
    assert sp.report(record).count("] policy >= 1.8x") == 1


def test_the_variants_compute_the_same_step(monkeypatch):
    """Same initial weights and batch: fp32 in either layout gives the same losses, bf16 a nearby CE.

    (The KD term of two random resnet8s is a tiny KL times τ² = 16, too sensitive to bf16 logits to
    compare; the CE term is not.)"""
    monkeypatch.setattr("kdlib.precision.cpu_has_native_bf16", lambda: True)
    monkeypatch.delenv("KDLIB_PRECISION", raising=False)
    settings = sp.resolve(bench.parse_args(["--cpu-precision", "--quick", "--batch-sizes", "8", "--samples", "8"]))
    data = sp.random_data(settings)
    found = sp.variants()
    first = {name: sp.KDLoop(settings, p).run(sp.batches(data, 1, 8, seed=0)) for name, p in found.items()}
    (ce, kd), (ce_cl, kd_cl), (ce_bf16, kd_bf16) = (first[name] for name in VARIANTS)
    assert ce_cl == pytest.approx(ce, rel=1e-5) and kd_cl == pytest.approx(kd, rel=1e-4)
    assert ce_bf16 == pytest.approx(ce, rel=2e-3) and ce_bf16 != ce and math.isfinite(kd_bf16)
    assert found["policy"].dtype == torch.bfloat16


@pytest.mark.slow
def test_precision_figure_is_written(precision_run):
    with Image.open(precision_run["figure"]) as img:
        assert img.format == "PNG" and img.width > 700 and img.height > 400  # 7 × 4.2 in at 120 dpi


def test_policy_is_not_timed_twice_where_it_is_fp32(monkeypatch):
    monkeypatch.delenv("KDLIB_PRECISION", raising=False)
    monkeypatch.setattr("kdlib.precision.cpu_has_native_bf16", lambda: False)
    found = sp.variants()
    assert list(found) == ["fp32-nchw", "fp32-channels_last"] and sp.policy_key(found) == "fp32-channels_last"
    monkeypatch.setenv("KDLIB_PRECISION", "bf16")
    with pytest.warns(UserWarning, match="emulates"):
        assert list(sp.variants()) == list(VARIANTS)


def test_precision_defaults_are_the_book_pair_and_stay_in_place():
    args = bench.parse_args(["--cpu-precision"])
    settings = sp.resolve(args)
    assert (settings.teacher, settings.student, settings.batch, settings.threads) == ("resnet14", "resnet8", 64, 2)
    assert settings.samples == PROFILE_TABLE["book"].data.train_size and not settings.quick
    out, figure = bench.output_paths(args, settings)
    assert out == REPO / "results" / "speed_cpu.json" and figure == REPO / "book" / "_static" / "speed_cpu.png"
    quick = bench.parse_args(["--cpu-precision", "--quick"])
    for path in bench.output_paths(quick, sp.resolve(quick)):
        assert REPO not in path.resolve().parents


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "times the CPU"),
    (["--batch-sizes", "32", "64"], "one batch size"),
    (["--methods", "at"], "--methods does not apply"),
    (["--profile"], "--profile does not apply"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--pair", "resnet8", "nope"], "unknown model 'nope'"),
])
def test_precision_mode_bad_input_is_a_kdlib_error(argv, message):
    with pytest.raises(KDLibError, match=message):
        sp.resolve(bench.parse_args(["--cpu-precision", *argv]))


def test_rounds_belong_to_the_precision_mode():
    with pytest.raises(KDLibError, match="--rounds applies to --cpu-precision only"):
        bench.main(["--quick", "--device", "cpu", "--rounds", "2"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quick_run_on_cuda(tmp_path):
    """The three loops and every distiller on the GPU: bf16 autocast there, memory from CUDA's allocator."""
    record = bench.main(["--quick", "--device", "cuda", "--pair", "resnet8", "resnet8", "--batch-sizes", "16",
                         "--samples", "64", "--timed-samples", "32", "--distill-steps", "1",
                         "--out", str(tmp_path / "s.json"), "--figure", str(tmp_path / "s.png")])
    assert record["device"].startswith("cuda: ") and record["device_kind"] != "cpu"
    assert record["settings"]["loops"]["engine"]["precision"] == "bf16-autocast"
    for method, row in record["measurements"]["distillers"]["16"].items():
        assert row["peak_memory"]["device"].startswith("cuda") and row["peak_memory"]["bytes"] > 0, method
