"""The CIFAR model zoo: shapes, parameter counts, hookable features, initialisation, registry errors.

Each zoo model runs one probed forward pass (batch 2, 32×32, eval, no_grad), cached per model, in
which every stage and block output is recorded (by reference and as a clone) together with what
its consumer receives; the tests below read that record.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlib import KDLibError
from kdlib.models import StagedNet, create_model, list_models, register_model
from kdlib.models.mobilenetv2 import InvertedResidual
from kdlib.models.vgg import ConvUnit
from kdlib.models.wrn import PreActBlock

NUM_CLASSES = 100

# RepDistiller's parameter counts at 100 classes (METHODS.md), in millions.
PARAMS_M = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet56": 0.86,
    "wrn_16_2": 0.70, "wrn_40_2": 2.26, "vgg8": 3.97, "vgg13": 9.46,
}

_R16 = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
_R32 = [(32, 32, 32), (64, 16, 16), (128, 8, 8)]
_R64 = [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
_VGG = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
STAGE_SHAPES = {
    **{f"resnet{d}": _R16 for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _R64, "resnet32x4": _R64,
    "wrn_16_2": _R32, "wrn_40_2": _R32, "wrn_16_1": _R16, "wrn_40_1": _R16,
    **{f"vgg{d}": _VGG for d in (8, 11, 13, 16, 19)},
    # documented in the model files' docstrings (RepDistiller's feature points)
    "ResNet50": [(256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
    "MobileNetV2": [(12, 16, 16), (16, 8, 8), (48, 4, 4), (1280, 2, 2)],
    "ShuffleV1": [(240, 16, 16), (480, 8, 8), (960, 4, 4)],
    "ShuffleV2": [(116, 16, 16), (232, 8, 8), (1024, 4, 4)],
}

# Blocks whose output is legitimately not a post-activation module output (documented exceptions):
# pre-activation WRN blocks end in the residual sum, inverted residuals in a linear bottleneck.
SIGNED_BLOCKS = (PreActBlock, InvertedResidual)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def consumer_name(model: StagedNet, name: str) -> str:
    """The module that reads ``name``'s output next: the next block, the next stage, or the head."""
    parts = name.split(".")
    if parts == ["stem"]:
        return "stages.0"
    i = int(parts[1])
    if len(parts) == 3:
        j = int(parts[2])
        if j + 1 < len(model.stages[i]):
            return f"stages.{i}.{j + 1}"
        return f"stages.{i + 1}.0" if i + 1 < len(model.stages) else "head"
    return f"stages.{i + 1}" if i + 1 < len(model.stages) else "head"


@functools.cache
def probe(name: str) -> dict:
    """One forward pass of zoo model ``name`` with every feature and its consumer's input recorded."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    modules = dict(model.named_modules())
    tapped = ["stem", *model.stage_names, *model.block_names]
    out_ref, out_clone, out_version, consumed, produced = {}, {}, {}, {}, {}
    handles = []

    def on_output(n):
        def hook(_m, _i, out):
            out_ref[n], out_clone[n], out_version[n] = out, out.clone(), out._version
        return hook

    def on_input(n):
        def hook(_m, inputs):
            consumed[n] = inputs[0].clone()
        return hook

    def on_submodule(block_name):
        def hook(_m, _i, out):
            produced.setdefault(block_name, []).append(out)
        return hook

    for n in tapped:
        handles.append(modules[n].register_forward_hook(on_output(n)))
        c = consumer_name(model, n)
        handles.append(modules[c].register_forward_pre_hook(on_input(c)))
    for n in model.block_names:
        for sub in list(modules[n].modules())[1:]:
            handles.append(sub.register_forward_hook(on_submodule(n)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    return dict(model=model, logits=logits, ref=out_ref, clone=out_clone, version=out_version,
                consumed=consumed, produced=produced)


ALL = list_models()


def test_zoo_has_every_repdistiller_name():
    expected = {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)} | {"resnet8x4", "resnet32x4"}
    expected |= {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "ResNet50", "MobileNetV2", "ShuffleV1",
                 "ShuffleV2"} | {f"vgg{d}" for d in (8, 11, 13, 16, 19)}
    assert set(ALL) == expected
    assert ALL == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_is_staged_net_returning_logits(name):
    p = probe(name)
    assert isinstance(p["model"], StagedNet)
    assert isinstance(p["logits"], torch.Tensor) and p["logits"].shape == (2, NUM_CLASSES)
    assert torch.isfinite(p["logits"]).all()


@pytest.mark.parametrize("name", ALL)
def test_stage_shapes(name):
    p = probe(name)
    shapes = [tuple(p["ref"][s].shape[1:]) for s in p["model"].stage_names]
    assert shapes == STAGE_SHAPES[name]
    assert p["model"].last_stage_name == p["model"].stage_names[-1]


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_parameter_count_matches_repdistiller(name):
    n = count_params(create_model(name, num_classes=NUM_CLASSES))
    assert abs(n / 1e6 - PARAMS_M[name]) <= 0.01 * PARAMS_M[name], n


@pytest.mark.parametrize("name", ALL)
def test_hooked_features_are_what_the_consumer_receives(name):
    """The hook's tensor equals the next module's input, and nothing mutates it in place later."""
    p = probe(name)
    model = p["model"]
    for n in ["stem", *model.stage_names, *model.block_names]:
        c = consumer_name(model, n)
        assert torch.equal(p["clone"][n], p["consumed"][c]), f"{n} -> {c}"
        assert p["ref"][n]._version == p["version"][n], f"{n} was modified in place after its hook"
        assert torch.equal(p["ref"][n], p["clone"][n]), f"{n} was modified in place after its hook"


@pytest.mark.parametrize("name", ALL)
def test_stage_output_is_its_last_block_output(name):
    p = probe(name)
    model = p["model"]
    blocks = set(model.block_names)
    for i, s in enumerate(model.stage_names):
        last = f"{s}.{len(model.stages[i]) - 1}"
        assert last in blocks
        assert p["ref"][s] is p["ref"][last]


@pytest.mark.parametrize("name", ALL)
def test_block_outputs_are_module_outputs_and_post_activation(name):
    """Each block returns a tensor some submodule produced (its ReLU, or the shuffle of ReLU
    outputs), and it is non-negative; only the documented residual-sum blocks are exempt."""
    p = probe(name)
    modules = dict(p["model"].named_modules())
    for n in p["model"].block_names:
        out = p["ref"][n]
        block = modules[n]
        if isinstance(block, SIGNED_BLOCKS):
            continue
        assert any(o is out for o in p["produced"][n]), f"{n}: output not produced by a submodule"
        assert out.min() >= 0, f"{n}: output is not post-activation"


@pytest.mark.parametrize("name", ALL)
def test_blocks_are_real_blocks(name):
    """Block names point at modules with parameters (no pools, no bare activations)."""
    model = create_model(name, num_classes=10)
    modules = dict(model.named_modules())
    assert model.block_names, name
    for n in model.block_names:
        assert any(True for _ in modules[n].parameters()), n
        assert not isinstance(modules[n], (nn.MaxPool2d, nn.ReLU, nn.AvgPool2d)), n


def test_vgg_blocks_skip_max_pools():
    model = create_model("vgg13", num_classes=10)
    modules = dict(model.named_modules())
    units = [modules[n] for n in model.block_names]
    assert all(isinstance(u, ConvUnit) for u in units)
    assert len(units) == 10  # vgg13: 10 convs (the name counts the original 3 FC layers too)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 32 -> 16 -> 8 -> 4; RepDistiller's 4th pool is for 64×64 inputs only


@pytest.mark.parametrize("name", ["ShuffleV1", "wrn_16_1", "MobileNetV2", "vgg8"])
def test_num_classes_sets_the_classifier_and_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    logits.square().sum().backward()
    for pname, prm in model.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), pname
        assert prm.grad.abs().sum() > 0, pname


# --- initialisation (RepDistiller's) -----------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet32x4", "wrn_16_2", "vgg8", "MobileNetV2", "ResNet50"])
def test_he_normal_fan_out_init(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = max(convs, key=lambda m: m.weight.numel())
    k = big.kernel_size[0] * big.kernel_size[1] * big.out_channels
    assert big.weight.std().item() == pytest.approx(math.sqrt(2.0 / k), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_linear_init_follows_each_repdistiller_file():
    torch.manual_seed(0)
    vgg = create_model("vgg13", num_classes=NUM_CLASSES).head.fc
    assert vgg.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not vgg.bias.any()
    wrn = create_model("wrn_40_2", num_classes=NUM_CLASSES).head.fc
    assert not wrn.bias.any() and wrn.weight.abs().max() <= 1 / math.sqrt(128)  # PyTorch default weight
    res = create_model("resnet56", num_classes=NUM_CLASSES).head.fc
    assert res.bias.any()  # PyTorch default, untouched


def test_shufflenets_keep_pytorch_default_init():
    """RepDistiller has no init for ShuffleNets: convs stay Kaiming-uniform(a=√5), |w| ≤ 1/√fan_in."""
    torch.manual_seed(0)
    for name in ("ShuffleV1", "ShuffleV2"):
        for m in create_model(name).modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                assert m.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7


# --- independent re-implementations -------------------------------------------------------------

def _randomise_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) + 0.5


def _bn(sd, prefix, x):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], False, 0.0, 1e-5)


def functional_cifar_resnet(sd, x, blocks):
    """He et al.'s CIFAR ResNet written out with F ops, from the state dict alone."""
    x = F.relu(_bn(sd, "stem.1", F.conv2d(x, sd["stem.0.weight"], padding=1)))
    for i in range(3):
        for j in range(blocks):
            p, stride = f"stages.{i}.{j}", (2 if i > 0 and j == 0 else 1)
            out = F.relu(_bn(sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            out = _bn(sd, f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.shortcut.0.weight" in sd:
                x = _bn(sd, f"{p}.shortcut.1", F.conv2d(x, sd[f"{p}.shortcut.0.weight"], stride=stride))
            x = F.relu(out + x)
    return F.linear(x.mean((2, 3)), sd["head.fc.weight"], sd["head.fc.bias"])


def functional_wrn(sd, x, blocks):
    """Pre-activation WRN with F ops: the projection reads the activated input."""
    x = F.conv2d(x, sd["stem.weight"], padding=1)
    for i in range(3):
        for j in range(blocks):
            p, stride = f"stages.{i}.{j}", (2 if i > 0 and j == 0 else 1)
            act = F.relu(_bn(sd, f"{p}.bn1", x))
            out = F.conv2d(act, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            out = F.conv2d(F.relu(_bn(sd, f"{p}.bn2", out)), sd[f"{p}.conv2.weight"], padding=1)
            if f"{p}.shortcut.weight" in sd:
                x = F.conv2d(act, sd[f"{p}.shortcut.weight"], stride=stride)
            x = x + out
    x = F.relu(_bn(sd, "head.bn", x))
    return F.linear(x.mean((2, 3)), sd["head.fc.weight"], sd["head.fc.bias"])


@pytest.mark.parametrize("name, blocks, reference", [
    ("resnet14", 2, functional_cifar_resnet),
    ("resnet8x4", 1, functional_cifar_resnet),
    ("wrn_16_2", 2, functional_wrn),
])
def test_matches_functional_reimplementation(name, blocks, reference):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    _randomise_bn(model, 1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(model.state_dict(), x, blocks)
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_resnet8_golden_logits():
    """Seeded init + seeded input: numbers computed once; catches silent architecture/init changes."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    golden = torch.tensor([-0.030068, -0.271886, -0.036748, -0.164212, -0.160779, -0.214272, -0.335464,
                           -0.003111, -0.017075, 0.221761])
    assert torch.allclose(logits[0], golden, atol=1e-4)
    assert torch.allclose(logits, functional_cifar_resnet(model.state_dict(), x, 1), atol=1e-5)


# --- registry -------------------------------------------------------------------------------------

def test_unknown_name_lists_available_models():
    with pytest.raises(KDLibError) as err:
        create_model("resnet9")
    msg = str(err.value)
    assert "resnet9" in msg and "\n" not in msg
    assert all(n in msg for n in list_models())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_num_classes(bad):
    with pytest.raises(KDLibError, match="num_classes"):
        create_model("resnet8", num_classes=bad)


def test_unknown_option_is_a_kdlib_error_and_known_options_work():
    with pytest.raises(KDLibError, match="drop_rate"):
        create_model("resnet8", drop_rate=0.3)
    wrn = create_model("wrn_16_1", num_classes=10, drop_rate=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in wrn.modules()) == 6
    with pytest.raises(KDLibError, match="drop_rate"):
        create_model("wrn_16_1", drop_rate=1.5)
    with pytest.raises(KDLibError, match="net_size"):
        create_model("ShuffleV2", net_size=3)


def test_register_model_rejects_a_taken_name():
    with pytest.raises(KDLibError, match="resnet8"):
        register_model("resnet8")(lambda num_classes=100: None)
    assert "resnet8" in list_models()
