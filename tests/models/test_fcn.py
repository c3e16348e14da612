"""The FCN: shapes for every switch, hand-counted parameters, Table 1, names, errors, gradient flow."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow.errors import GradflowError
from gradflow.models import FCN, LONG_SKIPS, Stage, paper_fcn, simple_fcn, stage_of


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- shapes for every combination

@pytest.mark.parametrize("block,long_skip", list(itertools.product(["simple", "basic", "bottleneck"], LONG_SKIPS)))
def test_output_shape_equals_input_shape(block, long_skip):
    x = torch.randn(2, 1, 8, 12)
    for batch_norm, short_skip in itertools.product([True, False], [True, False]):
        model = simple_fcn(depth=2, levels=2, width=8, block=block, batch_norm=batch_norm,
                           short_skip=short_skip, long_skip=long_skip)
        out = model(x)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()


def test_only_first_copy_downsamples_and_only_last_upsamples():
    model = simple_fcn(depth=3, levels=3, width=4)
    assert [(b.downsample, b.upsample) for b in model.down2] == [(True, False), (False, False), (False, False)]
    assert [(b.downsample, b.upsample) for b in model.across] == [(True, False), (False, False), (False, True)]
    assert [(b.downsample, b.upsample) for b in model.up1] == [(False, False), (False, False), (False, True)]
    single = simple_fcn(depth=1, levels=2, width=4)
    assert (single.across.block0.downsample, single.across.block0.upsample) == (True, True)


def test_stage_resolutions_follow_the_levels():
    """levels=3 at 32²: down1 32, down2 16, down3 8, across 8 (4 inside), up1 16, up2 32, up3 32."""
    model = simple_fcn(depth=2, levels=3, width=4)
    sizes = {}
    for name in ["down1", "down2", "down3", "across", "up1", "up2", "up3"]:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[-1]))
    inner = {}
    model.across.block0.register_forward_hook(lambda m, i, o: inner.__setitem__("across", o.shape[-1]))
    model(torch.randn(1, 1, 32, 32))
    assert sizes == {"down1": 32, "down2": 16, "down3": 8, "across": 8, "up1": 16, "up2": 32, "up3": 32}
    assert inner["across"] == 4


# ---------------------------------------------------------------- parameter counts by hand

def conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def test_simple_fcn_parameter_counts_by_hand():
    """depth 1, levels 2, width 4: down1 conv, down2, across, up1 simple blocks, up2 BN-ReLU-conv."""
    stem = conv_params(1, 4, 3)                  # 40
    simple = 2 * 4 + conv_params(4, 4, 3)        # BN + 3×3 conv = 156, no shortcut conv (4 → 4)
    out = 2 * 4 + conv_params(4, 4, 3)           # up2: BN + 3×3 conv = 156
    classifier = conv_params(4, 1, 1)            # 5
    base = stem + 3 * simple + out + classifier  # 669; sum skips add nothing (4 → 4 channels)
    per_skip = {
        "sum": 0,
        "none": 0,
        "concat": conv_params(4 + 4, 4, 1),                    # 36
        "sat": 4 + conv_params(4, 1, 1) + conv_params(4 + 1, 4, 1),   # select + attend + merge = 33
        "at": conv_params(4, 1, 1) + conv_params(4 + 1, 4, 1),         # 29
        "st": 4 + conv_params(4 + 4, 4, 1),                            # 40
    }
    for kind, extra in per_skip.items():
        assert n_params(simple_fcn(depth=1, levels=2, width=4, long_skip=kind)) == base + 2 * extra
    assert n_params(simple_fcn(depth=1, levels=2, width=4, batch_norm=False)) == base - 4 * 2 * 4
    assert n_params(simple_fcn(depth=3, levels=2, width=4)) == base + 3 * 2 * simple


def test_channel_changing_fcn_parameter_count_by_hand():
    """Bottleneck stages 4 → 8 → 16: shortcut convs where channels change, sum skips with 1×1 convs."""
    model = FCN([Stage("conv", 4), Stage("bottleneck", 8)], Stage("bottleneck", 16), long_skip="sum")
    down1 = conv_params(1, 4, 3)                                                    # 40
    down2 = (2 * 4 + conv_params(4, 2, 1) + 2 * 2 + conv_params(2, 2, 3) + 2 * 2
             + conv_params(2, 8, 1) + conv_params(4, 8, 1))                         # 128 (with shortcut)
    across = (2 * 8 + conv_params(8, 4, 1) + 2 * 4 + conv_params(4, 4, 3) + 2 * 4
              + conv_params(4, 16, 1) + conv_params(8, 16, 1))                      # 440
    skip1 = conv_params(16, 8, 1)                                                   # decoder 16 → 8: 136
    up1 = (2 * 8 + conv_params(8, 2, 1) + 2 * 2 + conv_params(2, 2, 3) + 2 * 2
           + conv_params(2, 8, 1))                                                  # 104, 8 → 8
    skip2 = conv_params(8, 4, 1)                                                    # 36
    up2 = 2 * 4 + conv_params(4, 4, 3)                                              # 156
    classifier = conv_params(4, 1, 1)
    assert n_params(model) == down1 + down2 + across + skip1 + up1 + skip2 + up2 + classifier  # 1045
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 1, 8, 8)


def bottleneck_params(cin: int, cout: int) -> int:
    inner = cout // 4
    convs = conv_params(cin, inner, 1) + conv_params(inner, inner, 3) + conv_params(inner, cout, 1)
    bns = 2 * (cin + inner + inner)
    return convs + bns + (conv_params(cin, cout, 1) if cin != cout else 0)


def bottleneck_stage(cin: int, cout: int, repeat: int) -> int:
    return bottleneck_params(cin, cout) + (repeat - 1) * bottleneck_params(cout, cout)


def test_table_1_parameter_count():
    """Table 1 written out by hand: the count of the built model equals it and lies within 1% of the
    authors' ≈ 11.5M (short skips, sum long skips, batch norm)."""
    simple32 = 2 * 32 + conv_params(32, 32, 3)
    expected = (
        conv_params(1, 32, 3)                        # down1 conv 3×3 32
        + simple32                                   # down2 simple 32
        + bottleneck_stage(32, 128, 3)               # down3 bottleneck 128 ×3
        + bottleneck_stage(128, 256, 8)              # down4 bottleneck 256 ×8
        + bottleneck_stage(256, 512, 10)             # down5 bottleneck 512 ×10
        + bottleneck_stage(512, 1024, 3)             # across bottleneck 1024 ×3
        + conv_params(1024, 512, 1) + bottleneck_stage(512, 512, 10)   # skip1 + up1
        + conv_params(512, 256, 1) + bottleneck_stage(256, 256, 8)     # skip2 + up2
        + conv_params(256, 128, 1) + bottleneck_stage(128, 128, 3)     # skip3 + up3
        + conv_params(128, 32, 1) + simple32                           # skip4 + up4
        + 2 * 32 + conv_params(32, 32, 3)            # (skip5 needs no conv) up5 BN-ReLU-conv 3×3 32
        + conv_params(32, 1, 1)                      # classifier
    )
    model = paper_fcn()
    assert n_params(model) == expected
    assert abs(expected - 11.5e6) / 11.5e6 < 0.01
    assert [len(getattr(model, s)) for s in ("down3", "down4", "down5", "across", "up1", "up2", "up3")] == \
        [3, 8, 10, 3, 10, 8, 3]


def test_narrower_table_1_keeps_its_stages_and_scales_every_width():
    """width=8: the same block types and repetitions, each stage's width × 8/32 (counted by hand)."""
    simple8 = 2 * 8 + conv_params(8, 8, 3)
    expected = (
        conv_params(1, 8, 3) + simple8
        + bottleneck_stage(8, 32, 3) + bottleneck_stage(32, 64, 8) + bottleneck_stage(64, 128, 10)
        + bottleneck_stage(128, 256, 3)
        + conv_params(256, 128, 1) + bottleneck_stage(128, 128, 10)
        + conv_params(128, 64, 1) + bottleneck_stage(64, 64, 8)
        + conv_params(64, 32, 1) + bottleneck_stage(32, 32, 3)
        + conv_params(32, 8, 1) + simple8
        + 2 * 8 + conv_params(8, 8, 3) + conv_params(8, 1, 1)
    )
    model = paper_fcn(width=8)
    assert n_params(model) == expected
    assert model.layer_names() == paper_fcn().layer_names()
    with pytest.raises(GradflowError, match="width"):
        paper_fcn(width=0)


# ---------------------------------------------------------------- names and order

def test_layer_names_read_like_the_paper_and_run_input_to_output():
    names = paper_fcn().layer_names()
    for expected in ("down1.conv", "down2.block0.conv", "down3.block2.conv1", "down3.block0.shortcut.conv",
                     "across.block0.conv2", "skip1.conv", "up1.block9.conv2", "up5.conv", "classifier"):
        assert expected in names
    assert names[0] == "down1.conv" and names[-1] == "classifier"
    assert "across.block0.conv" in simple_fcn(depth=2, levels=3, width=4).layer_names()
    # stages never go back: encoder, then centre, then decoder (skips sit inside the decoder)
    order = {"encoder": 0, "centre": 1, "decoder": 2, "skip": 2}
    ranks = [order[stage_of(n)] for n in names]
    assert ranks == sorted(ranks)


def test_modules_registered_in_input_to_output_order():
    model = simple_fcn(depth=1, levels=3, width=4, long_skip="sat")
    assert [name for name, _ in model.named_children()] == [
        "down1", "down2", "down3", "across", "skip1", "up1", "skip2", "up2", "skip3", "up3", "classifier"]
    assert [n for n in model.layer_names() if n.startswith("skip1")] == ["skip1.attend.conv", "skip1.conv"]
    assert [n for n, _ in model.skip1.named_parameters()][0] == "select.weight"


def test_switch_off_means_no_such_modules():
    model = simple_fcn(depth=2, levels=3, width=4, batch_norm=False, short_skip=False, long_skip="none",
                       dropout=0.25)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BatchNorm2d" not in kinds and "Shortcut" not in kinds
    assert not any(name.startswith("skip") for name, _ in model.named_children())
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.25] * (2 * 2 + 2 + 2 * 2)  # one per block


# ---------------------------------------------------------------- user mistakes

@pytest.mark.parametrize("size,nearest", [(100, 96), (24, 32), (8, 16), (250, 256)])
def test_input_size_error_names_nearest_valid_size(size, nearest):
    model = simple_fcn(depth=1, levels=4, width=4)
    with pytest.raises(GradflowError, match=f"nearest valid size: {nearest}×{nearest}"):
        model(torch.randn(1, 1, size, size))


def test_wrong_channel_count():
    with pytest.raises(GradflowError, match=r"\(N, 1, H, W\)"):
        simple_fcn(depth=1, levels=2, width=4)(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("kwargs,message", [
    ({"long_skip": "dense"}, "long_skip"), ({"block": "inception"}, "block"), ({"depth": 0}, "depth"),
    ({"levels": 0}, "levels"), ({"width": 0}, "width"), ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"), ({"depth": 2.5}, "depth"),
])
def test_invalid_switches(kwargs, message):
    with pytest.raises(GradflowError, match=message):
        simple_fcn(**kwargs)


def test_paper_fcn_invalid_switch():
    with pytest.raises(GradflowError, match="long_skip"):
        paper_fcn(long_skip="sums")


# ---------------------------------------------------------------- gradient flow at initialisation

def first_to_classifier(model: nn.Module, seed: int, size: int) -> tuple[float, float]:
    """(|∇ down1.conv.weight| / |∇ classifier.weight|,
        |∂L/∂(down1 output)| / |∂L/∂logits|) for one BCE step on random data."""
    torch.manual_seed(seed)
    x, y = torch.randn(2, 1, size, size), (torch.rand(2, 1, size, size) > 0.5).float()
    first = {}
    model.down1.register_forward_hook(lambda m, i, out: first.setdefault("out", out).retain_grad())
    logits = model(x)
    logits.retain_grad()
    F.binary_cross_entropy_with_logits(logits, y).backward()
    weights = model.down1.conv.weight.grad.norm() / model.classifier.weight.grad.norm()
    signal = first["out"].grad.norm() / logits.grad.norm()
    return weights.item(), signal.item()


def test_short_skips_close_the_gap_between_first_layer_and_classifier_gradients():
    """With batch norm, the plain depth-9 net's first-layer gradient is orders of magnitude off the
    classifier's (BN makes plain deep nets' gradients grow towards the input); short skips bring the
    two within about an order of magnitude. Ratios are compared, per seed."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        plain = simple_fcn(depth=9, levels=3, width=8, short_skip=False, long_skip="none")
        torch.manual_seed(seed)
        residual = simple_fcn(depth=9, levels=3, width=8, short_skip=True, long_skip="none")
        plain_ratio, _ = first_to_classifier(plain, seed, 32)
        residual_ratio, _ = first_to_classifier(residual, seed, 32)
        assert abs(math.log10(plain_ratio)) > 1.5
        assert abs(math.log10(residual_ratio)) < 1.0
        assert abs(math.log10(plain_ratio)) - abs(math.log10(residual_ratio)) > 1.5


def test_without_bn_plain_net_first_layer_gradient_cannot_vanish_at_init():
    """Depth 9, no BN, no short or long skips. With zero biases the net is positively homogeneous
    of degree 1 in every conv's weights (conv, ReLU, max-pool, repetition), so for every layer
    <W, ∂L/∂W> = <logits, ∂L/∂logits>: the same for the first layer as for the classifier. He init
    therefore gives no vanishing first-layer gradient at initialisation (the issue expected one);
    checked exactly in float64."""
    torch.manual_seed(0)
    model = simple_fcn(depth=9, levels=3, width=8, batch_norm=False, short_skip=False,
                       long_skip="none").double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    y = (torch.rand(2, 1, 32, 32) > 0.5).double()
    logits = model(x)
    logits.retain_grad()
    F.binary_cross_entropy_with_logits(logits, y).backward()
    reference = (logits * logits.grad).sum().item()
    for name in model.layer_names():
        weight = model.get_submodule(name).weight
        assert (weight * weight.grad).sum().item() == pytest.approx(reference, rel=1e-9), name


def test_without_bn_short_skips_amplify_the_gradient_reaching_the_first_layer():
    """Depth 9, no BN, no long skips: each He-initialised residual block adds a branch as large as
    its input, so the signal (and the gradient flowing back to the first layer) grows ~√2 per block:
    orders of magnitude more reaches the first layer than in the plain net. A hazard for no-BN
    residual training, recorded here so a change of initialisation shows up."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        plain = simple_fcn(depth=9, levels=3, width=8, batch_norm=False, short_skip=False, long_skip="none")
        torch.manual_seed(seed)
        residual = simple_fcn(depth=9, levels=3, width=8, batch_norm=False, short_skip=True, long_skip="none")
        _, plain_signal = first_to_classifier(plain, seed, 32)
        _, residual_signal = first_to_classifier(residual, seed, 32)
        assert math.log10(residual_signal) - math.log10(plain_signal) > 3


# ---------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("long_skip", ["sum", "sat"])
def test_cuda_smoke(long_skip):
    model = simple_fcn(depth=2, levels=3, width=8, long_skip=long_skip).cuda()
    x = torch.randn(2, 1, 32, 32, device="cuda")
    logits = model(x)
    assert logits.shape == x.shape and logits.device.type == "cuda"
    (logits.mean() + model.sparsity_loss()).backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())
    assert model.sparsity_loss().device.type == "cuda"


# ---------------------------------------------------------------- residual-branch init scaling

@pytest.mark.parametrize("block, branch_output", [("simple", "conv"), ("basic", "conv2"),
                                                  ("bottleneck", "conv3")])
def test_scaled_init_multiplies_each_branch_output_by_inverse_sqrt_of_block_count(block, branch_output):
    """Same seed, so ``init="scaled"`` must equal ``"he"`` except the last conv of each residual
    branch, which is × L^(-1/2); L counted by hand: (levels - 1) encoder stages + the across stage +
    (levels - 1) decoder stages, ``depth`` blocks each."""
    depth, levels = 2, 3
    blocks = (2 * levels - 1) * depth
    torch.manual_seed(0)
    he = simple_fcn(depth, levels, 8, block=block, batch_norm=False, init="he").state_dict()
    torch.manual_seed(0)
    scaled = simple_fcn(depth, levels, 8, block=block, batch_norm=False, init="scaled").state_dict()
    branch_outputs = {name for name in he if name.endswith(f".{branch_output}.weight")
                      and ".block" in name and ".shortcut." not in name}
    assert len(branch_outputs) == blocks
    for name in he:
        factor = blocks ** -0.5 if name in branch_outputs else 1.0
        torch.testing.assert_close(scaled[name], he[name] * factor, rtol=1e-6, atol=0, msg=name)


def test_scaled_init_std_follows_the_formula():
    """std of a scaled simple-block conv = He std √(2 / fan_in) × L^(-1/2), fan_in = 9 · width."""
    depth, levels, width = 4, 3, 32
    blocks = (2 * levels - 1) * depth
    torch.manual_seed(0)
    model = simple_fcn(depth, levels, width, batch_norm=False, init="scaled")
    weights = torch.cat([model.get_submodule(f"across.block{j}.conv").weight.detach().flatten()
                         for j in range(depth)])
    expected = math.sqrt(2.0 / (9 * width)) / math.sqrt(blocks)
    assert weights.std().item() == pytest.approx(expected, rel=0.03)
    first = model.down1.conv.weight.detach()  # not a residual branch: plain He (fan-in 9)
    assert first.std().item() == pytest.approx(math.sqrt(2.0 / 9), rel=0.3)


def test_scaled_init_leaves_nets_without_short_skips_at_he_init():
    torch.manual_seed(0)
    he = simple_fcn(3, 3, 8, batch_norm=False, short_skip=False, init="he").state_dict()
    torch.manual_seed(0)
    scaled = simple_fcn(3, 3, 8, batch_norm=False, short_skip=False, init="scaled").state_dict()
    assert all(torch.equal(he[name], scaled[name]) for name in he)


def test_scaled_init_keeps_no_bn_residual_logits_order_one():
    """Depth 9, no BN: He init makes each residual block ~double the signal's variance, so the
    logits are orders of magnitude above the input's scale; scaled init bounds the growth by
    ∏(1 + 1/L) ≤ e per path, so the logits stay O(1) (here: within a factor 10 of the input)."""
    x = torch.randn(2, 1, 32, 32)
    for seed in (0, 1):
        torch.manual_seed(seed)
        he = simple_fcn(9, 3, 8, batch_norm=False, init="he")
        torch.manual_seed(seed)
        scaled = simple_fcn(9, 3, 8, batch_norm=False, init="scaled")
        with torch.no_grad():
            assert he(x).std().item() > 1e3
            assert 0.1 < scaled(x).std().item() < 10


def test_unknown_init_is_a_user_error():
    with pytest.raises(GradflowError, match="unknown init 'xavier'"):
        simple_fcn(1, 2, 4, init="xavier")
