"""Blocks: resampling exact against hand-made tensors, shortcut rules, hand-counted parameters."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.models import BasicBlock, BottleneckBlock, Shortcut, SimpleBlock
from gradflow.models.blocks import decimate, repeat2x


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_decimate_keeps_even_rows_and_columns():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor([[[[0.0, 2.0], [8.0, 10.0]]]])
    assert torch.equal(decimate(x), expected)


def test_repeat2x_repeats_each_row_and_column():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[[[1.0, 1.0, 2.0, 2.0],
                               [1.0, 1.0, 2.0, 2.0],
                               [3.0, 3.0, 4.0, 4.0],
                               [3.0, 3.0, 4.0, 4.0]]]])
    assert torch.equal(repeat2x(x), expected)
    y = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat2x(y), y.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))


def test_shortcut_is_identity_decimation_or_repetition_without_parameters():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(Shortcut(3, 3, downsample=False, upsample=False)(x), x)
    assert torch.equal(Shortcut(3, 3, downsample=True, upsample=False)(x), x[..., ::2, ::2])
    up = x.repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert torch.equal(Shortcut(3, 3, downsample=False, upsample=True)(x), up)
    assert n_params(Shortcut(3, 3, downsample=True, upsample=True)) == 0


@pytest.mark.parametrize("downsample,upsample", [(False, False), (True, False), (False, True)])
def test_shortcut_uses_a_1x1_conv_only_where_channels_differ(downsample, upsample):
    shortcut = Shortcut(3, 5, downsample=downsample, upsample=upsample)
    assert n_params(shortcut) == 3 * 5 + 5  # 1×1 weights + bias
    x = torch.randn(2, 3, 8, 8)
    w, b = shortcut.conv.weight.detach()[:, :, 0, 0], shortcut.conv.bias.detach()
    resampled = x[..., ::2, ::2] if downsample else x
    expected = torch.einsum("oi,nihw->nohw", w, resampled) + b.view(1, -1, 1, 1)
    if upsample:
        expected = expected.repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(shortcut(x), expected)


def test_simple_block_against_hand_computation():
    """1 channel, no BN, conv = the identity kernel: out = maxpool(relu(x)) + x[::2, ::2]."""
    block = SimpleBlock(1, 1, downsample=True, batch_norm=False)
    with torch.no_grad():
        block.conv.weight.zero_()
        block.conv.weight[0, 0, 1, 1] = 1.0
    x = torch.tensor([[[[1.0, -2.0, 3.0, 0.5],
                        [-1.0, 4.0, -3.0, 2.0],
                        [0.0, -5.0, -1.0, -2.0],
                        [6.0, 1.0, -4.0, -6.0]]]])
    pooled = torch.tensor([[[[4.0, 3.0], [6.0, 0.0]]]])    # max over relu'd 2×2 windows
    decimated = torch.tensor([[[[1.0, 3.0], [0.0, -1.0]]]])
    assert torch.equal(block(x), pooled + decimated)


def test_simple_block_upsamples_after_the_conv():
    """Identity kernel, no BN, upsampling: out = repeat(relu(x)) + repeat(x)."""
    block = SimpleBlock(1, 1, upsample=True, batch_norm=False)
    with torch.no_grad():
        block.conv.weight.zero_()
        block.conv.weight[0, 0, 1, 1] = 1.0
    x = torch.tensor([[[[1.0, -2.0], [-3.0, 4.0]]]])
    expected = torch.tensor([[[[2.0, 2.0, -2.0, -2.0],
                               [2.0, 2.0, -2.0, -2.0],
                               [-3.0, -3.0, 8.0, 8.0],
                               [-3.0, -3.0, 8.0, 8.0]]]])
    assert torch.equal(block(x), expected)


@pytest.mark.parametrize("block_type,last_conv", [(SimpleBlock, "conv"), (BasicBlock, "conv2"),
                                                 (BottleneckBlock, "conv3")])
@pytest.mark.parametrize("downsample,upsample", [(False, False), (True, False), (False, True)])
def test_block_is_residual_plus_shortcut_or_residual_alone(block_type, last_conv, downsample, upsample):
    """Zeroing the last conv of the residual path leaves exactly the shortcut (short_skip on) or
    zeros (short_skip off)."""
    x = torch.randn(2, 8, 8, 8)
    shortcut = x[..., ::2, ::2] if downsample else x
    if upsample:
        shortcut = shortcut.repeat_interleave(2, -2).repeat_interleave(2, -1)
    for short_skip in (True, False):
        block = block_type(8, 8, downsample=downsample, upsample=upsample, short_skip=short_skip)
        with torch.no_grad():
            getattr(block, last_conv).weight.zero_()
        expected = shortcut if short_skip else torch.zeros_like(shortcut)
        torch.testing.assert_close(block(x), expected)
        assert (block.shortcut is not None) == short_skip


def test_parameter_counts_by_hand():
    # simple 4→8 with BN: BN 2·4, conv 3·3·4·8 + 8, shortcut 1×1 4·8 + 8
    assert n_params(SimpleBlock(4, 8)) == 2 * 4 + (9 * 4 * 8 + 8) + (4 * 8 + 8)  # 344
    # basic 4→8: BN 2·4, conv 9·4·8 + 8, BN 2·8, conv 9·8·8 + 8, shortcut 4·8 + 8
    assert n_params(BasicBlock(4, 8)) == 8 + 296 + 16 + 584 + 40  # 944
    # bottleneck 8→16 (inner 4): BN 16, 1×1 8·4+4, BN 8, 3×3 9·4·4+4, BN 8, 1×1 4·16+16, shortcut 8·16+16
    assert n_params(BottleneckBlock(8, 16)) == 16 + 36 + 8 + 148 + 8 + 80 + 144  # 440
    # same widths, no BN, no short skip: only the convs of the residual path
    assert n_params(BottleneckBlock(8, 16, batch_norm=False, short_skip=False)) == 36 + 148 + 80
    assert n_params(SimpleBlock(8, 8)) == 2 * 8 + 9 * 8 * 8 + 8  # no shortcut conv: same widths


def test_batch_norm_off_means_no_batch_norm_layers():
    for block_type in (SimpleBlock, BasicBlock, BottleneckBlock):
        block = block_type(8, 8, batch_norm=False)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())


def test_strided_downsampling_of_basic_and_bottleneck_matches_decimation():
    """A stride-2 1×1 conv reads exactly the decimated pixels."""
    block = BottleneckBlock(8, 8, downsample=True, batch_norm=False)
    x = torch.randn(1, 8, 8, 8)
    conv1 = block.conv1
    expected = nn.functional.conv2d(torch.relu(x)[..., ::2, ::2], conv1.weight, conv1.bias)
    torch.testing.assert_close(conv1(torch.relu(x)), expected)
    for block_type in (BasicBlock, BottleneckBlock):
        assert block_type(8, 8, downsample=True)(x).shape == (1, 8, 4, 4)
        assert block_type(8, 8, upsample=True)(x).shape == (1, 8, 16, 16)
        assert block_type(8, 8, downsample=True, upsample=True)(x).shape == (1, 8, 8, 8)


def test_he_initialisation():
    block = SimpleBlock(64, 64)
    weight = block.conv.weight.detach()
    fan_in = 64 * 3 * 3
    he_std = math.sqrt(2.0 / fan_in)  # kaiming normal, fan-in, ReLU gain
    assert weight.std().item() == pytest.approx(he_std, rel=0.03)
    assert weight.mean().abs().item() < 0.05 * he_std  # ~10 standard errors of the mean
    assert torch.count_nonzero(block.conv.bias) == 0


def test_dropout_in_every_block():
    x = torch.randn(2, 8, 8, 8)
    for block_type, p in itertools.product((SimpleBlock, BasicBlock, BottleneckBlock), (0.0, 0.5)):
        block = block_type(8, 8, dropout=p)
        dropouts = [m for m in block.modules() if isinstance(m, nn.Dropout)]
        assert [d.p for d in dropouts] == ([p] if p > 0 else [])
        block.eval()
        assert torch.equal(block(x), block(x))


def test_bottleneck_width_must_divide_by_four():
    with pytest.raises(GradflowError, match="divisible by 4"):
        BottleneckBlock(8, 10)
