"""kdlib.data: the embedded ``shapes`` dataset, the CIFAR path through torchvision, and the loaders.

The CIFAR tests write a small archive in the real CIFAR-100 python format and replace only
torchvision's md5 check (the files are not the published ones); everything else runs as it does
for a user.
"""

from __future__ import annotations

import hashlib
import math
import pickle

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

from kdlib import KDLibError
from kdlib.config import DataConfig
from kdlib.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    SHAPE_CLASSES,
    SHAPES_MEAN,
    SHAPES_STD,
    DataNotFoundError,
    TensorBatches,
    augment_batch,
    default_data_root,
    generate_shapes,
    get_loaders,
)
from kdlib.data import shapes as S

# --------------------------------------------------------------------------------------------
# shapes: generation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train300():
    return generate_shapes(range(300), seed=5, split="train")


def test_same_seed_same_bytes_and_other_seed_differs(train300):
    images, labels, masks, _ = train300
    again = generate_shapes(range(300), seed=5, split="train")
    assert torch.equal(images, again[0]) and torch.equal(masks, again[2]) and torch.equal(labels, again[1])
    other = generate_shapes(range(300), seed=6, split="train")[0]
    assert (other != images).flatten(1).any(1).all()  # every image changes with the seed


def test_image_depends_only_on_seed_split_index(train300):
    images, labels, masks, params = train300
    picks = [257, 3, 299, 0]  # across two chunks, out of order
    alone = generate_shapes(picks, seed=5, split="train")
    assert torch.equal(alone[0], images[picks]) and torch.equal(alone[2], masks[picks])
    assert torch.equal(alone[1], labels[picks])
    assert torch.equal(alone[3].radius, params.radius[picks])
    single = generate_shapes([257], seed=5, split="train")
    assert torch.equal(single[0][0], images[257])


def test_bytes_do_not_depend_on_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = generate_shapes(range(256), seed=2)
        torch.set_num_threads(2)
        two = generate_shapes(range(256), seed=2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])


def test_train_and_test_share_no_sample(train300):
    def digests(images):
        return {hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images}

    test_images = generate_shapes(range(300), seed=5, split="test")[0]
    train_d, test_d = digests(train300[0]), digests(test_images)
    assert len(train_d) == 300 and len(test_d) == 300  # no duplicates within a split either
    assert not train_d & test_d


def test_classes_balanced_and_named(train300):
    labels = train300[1]
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 30))
    odd = generate_shapes(range(305), seed=1, num_classes=7)[1]
    counts = torch.bincount(odd, minlength=7)
    assert counts.max() - counts.min() <= 1 and int(odd.max()) == 6
    assert SHAPE_CLASSES[:3] == ("circle", "square", "triangle") and len(set(SHAPE_CLASSES)) == 10


def test_masks_non_empty_and_where_the_object_was_drawn():
    params = S.chunk_params(seed=3, split="test", chunk=0)
    full, masks = S.render(params)
    no_main, masks_again = S.render(params, main=False)
    bg_only, _ = S.render(params, main=False, distractor=False)
    with_main_only, _ = S.render(params, distractor=False)
    support = S._main_alpha(params, SHAPE_CLASSES) > 0
    assert torch.equal(masks, masks_again)  # the mask is the main object's, whatever is drawn
    area = masks.sum((1, 2))
    assert (area > 40).all()  # every mask is a real object, not a few edge pixels
    assert 0.12 < area.float().mean().item() / 1024 < 0.28  # calibration: ~19 % of the image
    # Outside the main object's coverage, drawing it changes nothing, to the byte.
    changed = (full != no_main).any(1)
    assert not (changed & ~support).any()
    # Inside the mask, the object stands out from the background alone (contrast rule).
    diff = (with_main_only.int() - bg_only.int()).abs().amax(1)
    for d, m in zip(diff, masks):
        inside = d[m].float()
        assert (inside > 20).float().mean() > 0.95 and inside.mean() > 60


def test_distractor_window_holds_whole_distractor():
    """The windowed distractor equals the same distractor rendered on the full image."""
    params = S.chunk_params(seed=0, split="train", chunk=1, difficulty=2.0)  # big aspect jitter
    windowed = S._distractor_alpha(params, SHAPE_CLASSES)
    idx = params.has_distractor.nonzero().squeeze(1)
    zero = torch.zeros(len(idx))
    rows = S._frame_rows(params.d_radius[idx], params.d_cx[idx], params.d_cy[idx], params.d_angle[idx],
                         params.d_log_aspect[idx], zero, zero, S.IMAGE_SIZE)
    full = S._coverage(params.d_label[idx], SHAPE_CLASSES, rows, S.IMAGE_SIZE)
    assert torch.allclose(windowed[idx], full, atol=1e-4)
    assert (windowed[params.has_distractor.logical_not()] == 0).all()


def _naive_alpha(sdf_unit, p, i):
    """Straightforward per-pixel re-implementation of a main object's 2×2-supersampled coverage."""
    r, cx, cy = p.radius[i].item(), p.cx[i].item(), p.cy[i].item()
    ang, a = p.angle[i].item(), math.exp(p.log_aspect[i].item())
    alpha = torch.zeros(32, 32, dtype=torch.float64)
    for row in range(32):
        for col in range(32):
            total = 0.0
            for sy in (0.25, 0.75):
                for sx in (0.25, 0.75):
                    dx, dy = col + sx - cx, row + sy - cy
                    u = (math.cos(ang) * dx + math.sin(ang) * dy) / (a * r)
                    v = (-math.sin(ang) * dx + math.cos(ang) * dy) * a / r
                    total += min(1.0, max(0.0, 0.5 - sdf_unit(u, v) * r * 2))
            alpha[row, col] = total / 4
    return alpha


@pytest.mark.parametrize(
    ("label", "sdf_unit"),
    [(0, lambda u, v: math.hypot(u, v) - 0.8), (1, lambda u, v: max(abs(u), abs(v)) - 0.7)],
    ids=["circle", "square"],
)
def test_coverage_matches_naive_supersampling(label, sdf_unit):
    params = S.chunk_params(seed=0, split="train", chunk=0)
    alpha = S._main_alpha(params, SHAPE_CLASSES)
    i = label  # image i has label i % 10
    assert torch.allclose(alpha[i].double(), _naive_alpha(sdf_unit, params, i), atol=1e-4)


def test_sdf_areas_match_geometry():
    """Area inside each SDF (Monte Carlo, unit radius) against the shape's closed-form area."""
    expected = {
        "circle": math.pi * 0.8**2, "square": 1.4**2, "triangle": 3 * math.sqrt(3) / 4, "plus": 1.75,
        "ring": math.pi * (0.9**2 - 0.55**2), "star": 5 * 0.45 * 1.05**2 * math.sin(math.radians(36)),
        "diamond": 2 * 1.0 * 0.65, "hexagon": 1.5 * math.sqrt(3) * 0.85**2,
        "L": 1.1 * 1.7 - 0.65 * 1.25, "T": 1.5 * 0.45 + 0.44 * 1.05,
    }
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(2, 200_000, generator=g) * 3 - 1.5
    for name, sdf in S.SDFS.items():
        u, v = pts[0].clone(), pts[1].clone()
        inside = (sdf(u, v, torch.empty_like(u), torch.empty_like(u)) < 0).float().mean().item() * 9
        assert inside == pytest.approx(expected[name], abs=0.03), name


def test_golden_values_seed0():
    """Numbers computed once (kdlib 0.1.0, DATASET_VERSION 1): catch accidental changes of the recipe."""
    images, labels, masks, p = generate_shapes(range(6), seed=0, split="train")
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert p.radius.tolist() == pytest.approx([12.2006, 10.309546, 11.286818, 12.501823, 12.880572, 10.12674],
                                             abs=1e-5)
    assert p.cx.tolist() == pytest.approx([22.016249, 19.933022, 15.668646, 13.949535, 18.120766, 18.879395],
                                         abs=1e-5)
    assert p.bg_type.tolist() == [1, 1, 2, 1, 2, 2]
    assert masks.sum((1, 2)).tolist() == pytest.approx([302, 206, 166, 272, 265, 148], abs=2)
    assert images.float().mean((1, 2, 3)).tolist() == pytest.approx(
        [167.45, 141.248, 108.521, 110.018, 167.739, 172.398], abs=0.5)
    # Cross-check the mask counts with the geometry: a disc of radius 0.8 r covers π(0.8 r)² px
    # (image 0 is a circle well inside the frame).
    assert masks[0].sum().item() == pytest.approx(math.pi * (0.8 * p.radius[0].item()) ** 2, rel=0.03)


def test_difficulty_zero_has_no_nuisance():
    params = S.chunk_params(seed=0, split="train", chunk=0, difficulty=0.0)
    assert not params.has_distractor.any() and (params.noise_sigma == 0).all()
    assert torch.equal(params.bg_c1, params.bg_c2)
    background, _ = S.render(params, main=False)
    assert (background == background[:, :, :1, :1]).all()  # one flat colour per image


@pytest.mark.parametrize(
    "kwargs", [{"split": "holdout"}, {"num_classes": 11}, {"num_classes": 1}, {"difficulty": -1.0}]
)
def test_bad_arguments_raise_kdlib_error(kwargs):
    with pytest.raises(KDLibError):
        generate_shapes(range(3), **kwargs)


# --------------------------------------------------------------------------------------------
# shapes: loaders
# --------------------------------------------------------------------------------------------


def _cfg(**kw):
    return DataConfig(**{"name": "shapes", "train_size": 200, "test_size": 100, "batch_size": 64, **kw})


def _epoch(stream, epoch):
    stream.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in stream]


def test_shapes_loader_batches_are_a_function_of_seed_and_epoch():
    a, b = get_loaders(_cfg(), seed=0), get_loaders(_cfg(), seed=0)
    assert len(a.train) == 4 and len(a.test) == 2  # 200/64 rounds up: the partial batch is kept
    run_a = [_epoch(a.train, e) for e in range(3)]
    resumed = _epoch(b.train, 2)  # a run resumed at epoch 2 sees the same batches
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(run_a[2], resumed))
    assert [len(y) for _, y in run_a[0]] == [64, 64, 64, 8]
    assert not torch.equal(run_a[0][0][0], run_a[1][0][0])
    other_seed = _epoch(get_loaders(_cfg(), seed=1).train, 2)
    assert not torch.equal(other_seed[0][0], resumed[0][0])
    # Every image appears once per epoch.
    assert sorted(torch.cat([y for _, y in run_a[1]]).tolist()) == sorted(a.train_set.labels.tolist())


def test_shapes_augmentation_changes_with_epoch_and_seed():
    """Twenty copies of one image: batches differ only through their augmentation."""
    image = generate_shapes([0], seed=0)[0].expand(20, 3, 32, 32)
    labels = torch.zeros(20, dtype=torch.long)

    def epoch(seed, e):
        stream = TensorBatches(image, labels, 20, SHAPES_MEAN, SHAPES_STD, train=True, seed=seed)
        stream.set_epoch(e)
        return next(iter(stream))[0]

    assert torch.equal(epoch(0, 1), epoch(0, 1))
    assert not torch.equal(epoch(0, 1), epoch(0, 2)) and not torch.equal(epoch(0, 1), epoch(1, 1))
    assert len({tuple(x.flatten()[:64].tolist()) for x in epoch(0, 1)}) > 5  # several crops/flips


def test_shapes_test_stream_is_the_normalised_images():
    bundle = get_loaders(_cfg())
    ds = bundle.test_set
    xs, ys = zip(*_epoch(bundle.test, 0))
    x, y = torch.cat(xs), torch.cat(ys)
    mean, std = torch.tensor(SHAPES_MEAN).view(3, 1, 1), torch.tensor(SHAPES_STD).view(3, 1, 1)
    assert torch.allclose(x, (ds.images.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(y, ds.labels)
    assert torch.equal(torch.cat([x for x, _ in _epoch(bundle.test, 5)]), x)  # no augmentation
    assert torch.allclose(bundle.denormalize(x), ds.images.float() / 255, atol=1e-5)
    assert ds.masks.dtype == torch.bool and ds.masks.shape == (100, 32, 32)
    assert ds.images.dtype == torch.uint8
    assert bundle.num_classes == 10 and bundle.classes == list(SHAPE_CLASSES)


def test_augment_batch_matches_torchvision_crop_and_flip():
    images = generate_shapes(range(6), seed=1)[0]
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0], [0, 8], [4, 4]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = augment_batch(images, offsets, flips)
    for img, (top, left), flip, got in zip(images, offsets.tolist(), flips, out):
        want = TF.crop(TF.pad(img, [4]), top, left, 32, 32)  # zero padding, as RandomCrop(padding=4)
        want = TF.hflip(want) if flip else want
        assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_shapes_gpu_path_matches_cpu():
    cpu, gpu = get_loaders(_cfg()), get_loaders(_cfg(), device="cuda")
    for (x1, y1), (x2, y2) in zip(_epoch(cpu.train, 1), _epoch(gpu.train, 1)):
        assert x2.is_cuda and torch.allclose(x1, x2.cpu(), atol=1e-6) and torch.equal(y1, y2.cpu())


def test_unknown_dataset_and_bad_batch_size():
    with pytest.raises(KDLibError, match="unknown dataset"):
        get_loaders(DataConfig(name="mnist"))
    with pytest.raises(KDLibError, match="batch_size"):
        get_loaders(_cfg(batch_size=0))


# --------------------------------------------------------------------------------------------
# CIFAR-100 through torchvision, on a small archive in the real format
# --------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 12, 6


def _write_cifar100(root):
    """``cifar-100-python/{train,test,meta}``: pickled dicts with uint8 rows (R, G, B planes)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        data[0] = np.repeat(np.array([0, 128, 255], dtype=np.uint8), 1024)  # a known flat image
        fine = [(7 * i + (split == "test")) % 100 for i in range(n)]
        entry = {"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": split,
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
        arrays[split] = (data, fine)
    meta = {"fine_label_names": [f"class{i:02d}" for i in range(100)],
            "coarse_label_names": [f"super{i:02d}" for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return arrays


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A CIFAR-100 folder; torchvision's md5 check (of the published files) accepts it."""
    arrays = _write_cifar100(tmp_path)
    monkeypatch.setattr(torchvision.datasets.utils, "check_md5", lambda fpath, md5, **kw: True)
    return tmp_path, arrays


def _cifar_cfg(root, **kw):
    return DataConfig(**{"name": "cifar100", "root": str(root), "batch_size": 4, **kw})


def test_cifar100_test_split_is_normalised_with_crd_stats(cifar_root):
    root, arrays = cifar_root
    bundle = get_loaders(_cifar_cfg(root))
    assert bundle.num_classes == 100 and bundle.classes[3] == "class03"
    assert bundle.mean == CIFAR100_MEAN and bundle.std == CIFAR100_STD
    assert bundle.test_set.masks is None and bundle.train_set.masks is None
    xs, ys = zip(*_epoch(bundle.test, 0))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (N_TEST, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert y.tolist() == arrays["test"][1]
    # Image 0 is flat (R, G, B) = (0, 128, 255): the formula (v / 255 − mean) / std by hand.
    for c, v in enumerate((0, 128, 255)):
        want = (v / 255 - CIFAR100_MEAN[c]) / CIFAR100_STD[c]
        assert torch.allclose(x[0, c], torch.full((32, 32), want), atol=1e-5)
    raw = torch.from_numpy(arrays["test"][0]).view(-1, 3, 32, 32).float() / 255
    mean, std = torch.tensor(CIFAR100_MEAN).view(3, 1, 1), torch.tensor(CIFAR100_STD).view(3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std, atol=1e-5)
    assert torch.equal(torch.cat([x for x, _ in _epoch(bundle.test, 3)]), x)  # deterministic
    assert torch.allclose(bundle.denormalize(x), raw, atol=1e-5)


def _crops_and_flips(raw):
    """All 9×9×2 CRD augmentations of one normalised image (zero padding before normalising)."""
    mean, std = torch.tensor(CIFAR100_MEAN).view(3, 1, 1), torch.tensor(CIFAR100_STD).view(3, 1, 1)
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    out = []
    for top in range(9):
        for left in range(9):
            crop = (padded[:, top:top + 32, left:left + 32] - mean) / std
            out += [crop, crop.flip(-1)]
    return torch.stack(out)


def _by_label(stream, epoch):
    """Epoch ``epoch`` of a training stream as {label: image} (labels are distinct in the fixture)."""
    stream.set_epoch(epoch)
    return {int(label): image for x, y in stream for image, label in zip(x, y)}


def test_cifar100_train_split_is_augmented_reproducibly(cifar_root):
    root, arrays = cifar_root
    first = get_loaders(_cifar_cfg(root), seed=0)
    assert len(first.train) == 3
    epochs = [torch.cat([x for x, _ in _epoch(first.train, e)]) for e in range(2)]
    resumed = get_loaders(_cifar_cfg(root), seed=0)
    assert torch.equal(torch.cat([x for x, _ in _epoch(resumed.train, 1)]), epochs[1])
    # The augmentation of an image (not only the order) changes with the epoch and the seed.
    e0, e1 = _by_label(first.train, 0), _by_label(first.train, 1)
    s1 = _by_label(get_loaders(_cifar_cfg(root), seed=1).train, 1)
    assert any(not torch.equal(e0[k], e1[k]) for k in e0)
    assert any(not torch.equal(s1[k], e1[k]) for k in e1)
    # Each training tensor is one of the crops/flips of its image, and augmentation happened.
    raw = torch.from_numpy(arrays["train"][0]).view(-1, 3, 32, 32).float() / 255
    fine = arrays["train"][1]
    moved = 0
    for y, x in e0.items():
        candidates = _crops_and_flips(raw[fine.index(y)])
        assert ((candidates - x).abs().amax((1, 2, 3)) < 1e-5).any()
        moved += not torch.allclose(x, candidates[2 * (4 * 9 + 4)], atol=1e-5)  # not the identity crop
    assert moved > 0


def test_cifar_augmentation_does_not_depend_on_workers(cifar_root):
    root, _ = cifar_root
    single = torch.cat([x for x, _ in _epoch(get_loaders(_cifar_cfg(root), seed=3).train, 2)])
    workers = get_loaders(_cifar_cfg(root, num_workers=2), seed=3)
    assert torch.equal(torch.cat([x for x, _ in _epoch(workers.train, 2)]), single)


def test_missing_cifar_names_the_directory_and_how_to_download(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError) as err:
        get_loaders(_cifar_cfg(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python") in message and "download=True" in message
    assert "--download" in message and "\n" not in message
    assert isinstance(err.value, KDLibError)
    # Default root: $KDLIB_DATA, else ~/.cache/kdlib/data.
    monkeypatch.setenv("KDLIB_DATA", str(tmp_path / "elsewhere"))
    assert default_data_root() == tmp_path / "elsewhere"
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        get_loaders(DataConfig(name="cifar10"))
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "elsewhere")):
        get_loaders(DataConfig(name="cifar10"))
    monkeypatch.delenv("KDLIB_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_root() == tmp_path / ".cache" / "kdlib" / "data"
