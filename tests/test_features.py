"""Forward-hook feature taps on zoo models: names, order, values, hook removal, errors, BN safety."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlib import KDLibError
from kdlib.distill.base import feature_shapes
from kdlib.features import FeatureTap, block_names, extract_features, stage_names
from kdlib.models import create_model


@pytest.fixture
def resnet8():
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def manual_stage_outputs(model, x):
    """The staged forward written out, independent of hooks."""
    feats, h = [], model.stem(x)
    for stage in model.stages:
        h = stage(h)
        feats.append(h)
    return model.head(h), feats


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_names_of_a_zoo_model(resnet8):
    assert stage_names(resnet8) == ["stages.0", "stages.1", "stages.2"]
    assert block_names(resnet8) == ["stages.0.0", "stages.1.0", "stages.2.0"]
    vgg = create_model("vgg11", num_classes=10)
    # max-pools lead stages 1-3 and are not blocks
    assert block_names(vgg) == ["stages.0.0", "stages.1.1", "stages.2.1", "stages.2.2", "stages.3.1",
                                "stages.3.2", "stages.3.3", "stages.3.4"]


def test_extract_features_defaults_to_stages_in_order(resnet8, x):
    with torch.no_grad():
        logits, feats = extract_features(resnet8, x)
        ref_logits, ref_feats = manual_stage_outputs(resnet8, x)
    assert list(feats) == resnet8.stage_names
    assert torch.equal(logits, ref_logits)
    for got, want in zip(feats.values(), ref_feats, strict=True):
        assert torch.equal(got, want)
    assert [tuple(f.shape[1:]) for f in feats.values()] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_tap_orders_by_requested_names_not_execution(resnet8, x):
    names = ["stages.2", "stem", "stages.0.0"]
    with FeatureTap(resnet8, names) as tap, torch.no_grad():
        resnet8(x)
        ordered = tap.ordered()
    assert [tuple(t.shape[1:]) for t in ordered] == [(64, 8, 8), (16, 32, 32), (16, 32, 32)]
    assert tap.names == names


def test_hooks_are_removed_after_the_context_manager(resnet8, x):
    before = hook_count(resnet8)
    with FeatureTap(resnet8, resnet8.stage_names + resnet8.block_names) as tap:
        assert hook_count(resnet8) == before + 6
        with torch.no_grad():
            resnet8(x)
        first = tap["stages.2"]
    assert hook_count(resnet8) == before
    with torch.no_grad():
        resnet8(x + 1.0)
    assert tap["stages.2"] is first  # no hook fired on the second pass
    extract_features(resnet8, x, resnet8.block_names)
    assert hook_count(resnet8) == before


def test_hooks_are_removed_when_the_forward_pass_raises(resnet8):
    with pytest.raises(RuntimeError), FeatureTap(resnet8, resnet8.stage_names):
        resnet8(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert hook_count(resnet8) == 0


def test_unknown_module_name_is_a_one_line_kdlib_error(resnet8):
    with pytest.raises(KDLibError) as err:
        FeatureTap(resnet8, ["stages.0", "stages.7"])
    msg = str(err.value)
    assert "stages.7" in msg and "stages.2" in msg and "\n" not in msg
    assert hook_count(resnet8) == 0  # nothing half-registered


def test_names_of_a_non_zoo_model_are_an_error():
    with pytest.raises(KDLibError, match="stage_names"):
        stage_names(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(KDLibError, match="block_names"):
        block_names(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "MobileNetV2"])
def test_feature_shapes_leaves_bn_statistics_and_mode_alone(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = feature_shapes(model, model.stage_names)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN running statistics changed"
    assert list(shapes) == model.stage_names
    assert all(len(s) == 3 for s in shapes.values())
    assert hook_count(model) == 0
    # the same call in train mode *would* update them: the guard is doing the work
    model(torch.randn(2, 3, 32, 32))
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    key = next(k for k, m in model.named_modules() if m is bn)
    assert not torch.equal(before[f"{key}.running_mean"], bn.running_mean)


def test_feature_shapes_of_zoo_models_at_cifar_size():
    vgg = create_model("vgg8", num_classes=10).eval()
    assert list(feature_shapes(vgg, vgg.stage_names).values()) == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                                    (512, 4, 4)]
    assert not vgg.training
    shuffle = create_model("ShuffleV2", num_classes=10)
    assert feature_shapes(shuffle, ["stages.2.3", "stages.2"]) == {"stages.2.3": (464, 4, 4),
                                                                  "stages.2": (1024, 4, 4)}
