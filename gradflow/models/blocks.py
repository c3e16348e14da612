"""Pre-activation residual blocks of Drozdzal et al. 2016 (BN → ReLU → conv, He et al. 2016b).

Every block maps ``in_channels`` to ``out_channels`` and may halve the resolution (``downsample``)
and/or double it (``upsample``). Its output is ``residual(x) + shortcut(x)``; with
``short_skip=False`` it is ``residual(x)`` alone. With ``batch_norm=False`` the BN layers are
``nn.Identity`` (no parameters), so each unit is ReLU → conv.

Where the resolution changes (following the authors' code, ``veugene/fcn_maker``):

========== ======================================= ==============================================
block      downsample                              upsample
========== ======================================= ==============================================
simple     2×2 max-pool before the 3×3 conv        repeat rows and columns after conv + dropout
basic      first 3×3 conv has stride 2             repeat before the second 3×3 conv
bottleneck first 1×1 conv has stride 2             repeat after the last 1×1 conv (the same as
                                                   before it, since a 1×1 conv commutes with
                                                   nearest repetition, and 4× cheaper)
========== ======================================= ==============================================

The shortcut is the identity, :func:`decimate` when the block downsamples, :func:`repeat2x` when it
upsamples, and a 1×1 conv only where the channel counts differ; nothing else.

Convs get He init (kaiming normal, fan-in) and zero bias. Without batch norm, a He-initialised
residual branch is as large as its input, so each block with a short skip roughly doubles the
signal's variance: a no-BN ``simple_fcn(depth=9, levels=4)`` (63 blocks) starts with logits of
order 1e9. With BN, or without short skips, the scale stays O(1). ``FCN(init="scaled")`` fixes this
for no-BN residual nets by shrinking each branch's last conv (:attr:`Block.last_residual_conv`), see
:func:`gradflow.models.fcn.scale_residual_branches`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradflow.errors import GradflowError


def decimate(x: torch.Tensor) -> torch.Tensor:
    """Keep every second row and column, starting at the first: ``x[..., ::2, ::2]``."""
    return x[..., ::2, ::2]


def repeat2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2× upsampling: each row and each column is repeated twice.

    Equal to ``x.repeat_interleave(2, -2).repeat_interleave(2, -1)``; ``F.interpolate`` in
    ``"nearest"`` mode computes exactly that with a faster backward pass.
    """
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A 'same'-padded conv with He (kaiming normal, fan-in, ReLU gain) weights and zero bias."""
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


def norm(channels: int, batch_norm: bool) -> nn.Module:
    """BatchNorm2d, or a parameter-free identity when batch norm is switched off."""
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def dropout_layer(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Shortcut(nn.Module):
    """Identity path of a block: decimate / repeat to the residual's resolution, 1×1 conv only
    where channel counts differ (applied at the lower resolution, where it is cheapest — a 1×1
    conv commutes with decimation and repetition)."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample, self.upsample = downsample, upsample
        self.conv = conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = decimate(x)
        if self.conv is not None:
            x = self.conv(x)
        if self.upsample:
            x = repeat2x(x)
        return x


class Block(nn.Module):
    """Shared switches of all blocks; subclasses define ``residual`` and ``last_residual_conv``."""

    def __init__(self, in_channels: int, out_channels: int, *, downsample: bool = False,
                 upsample: bool = False, batch_norm: bool = True, short_skip: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.downsample, self.upsample = downsample, upsample
        self.batch_norm, self.short_skip, self.dropout_p = batch_norm, short_skip, dropout

    def add_shortcut(self) -> None:
        """Register the shortcut last, after the residual path's layers."""
        self.shortcut = (Shortcut(self.in_channels, self.out_channels, downsample=self.downsample,
                                  upsample=self.upsample) if self.short_skip else None)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def last_residual_conv(self) -> nn.Conv2d:
        """The residual path's last conv: its output is added to the shortcut (residual-branch init scales it)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + self.shortcut(x) if self.shortcut is not None else out


class SimpleBlock(Block):
    """BN → ReLU → (2×2 max-pool) → 3×3 conv → dropout → (repeat rows, columns) [+ shortcut]."""

    def __init__(self, in_channels: int, out_channels: int, **switches):
        super().__init__(in_channels, out_channels, **switches)
        self.bn = norm(in_channels, self.batch_norm)
        self.conv = conv(in_channels, out_channels, 3)
        self.dropout = dropout_layer(self.dropout_p)
        self.add_shortcut()

    @property
    def last_residual_conv(self) -> nn.Conv2d:
        return self.conv

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(x))
        if self.downsample:
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.conv(x))
        return repeat2x(x) if self.upsample else x


class BasicBlock(Block):
    """Two BN → ReLU → 3×3 conv units with dropout between them [+ shortcut]; the first conv has
    stride 2 when downsampling, rows and columns are repeated before the second when upsampling."""

    def __init__(self, in_channels: int, out_channels: int, **switches):
        super().__init__(in_channels, out_channels, **switches)
        self.bn1 = norm(in_channels, self.batch_norm)
        self.conv1 = conv(in_channels, out_channels, 3, stride=2 if self.downsample else 1)
        self.dropout = dropout_layer(self.dropout_p)
        self.bn2 = norm(out_channels, self.batch_norm)
        self.conv2 = conv(out_channels, out_channels, 3)
        self.add_shortcut()

    @property
    def last_residual_conv(self) -> nn.Conv2d:
        return self.conv2

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.conv1(F.relu(self.bn1(x))))
        x = F.relu(self.bn2(x))
        if self.upsample:
            x = repeat2x(x)
        return self.conv2(x)


class BottleneckBlock(Block):
    """BN-ReLU-conv units 1×1 (out/4) → 3×3 (out/4) → 1×1 (out), dropout [+ shortcut]. The output
    width is 4× the inner width, as in Table 1 (``bottleneck 128`` has 32-channel inner convs)."""

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, **switches):
        if out_channels % self.expansion:
            raise GradflowError(f"bottleneck blocks need a width divisible by 4, got {out_channels}")
        super().__init__(in_channels, out_channels, **switches)
        inner = out_channels // self.expansion
        self.bn1 = norm(in_channels, self.batch_norm)
        self.conv1 = conv(in_channels, inner, 1, stride=2 if self.downsample else 1)
        self.bn2 = norm(inner, self.batch_norm)
        self.conv2 = conv(inner, inner, 3)
        self.bn3 = norm(inner, self.batch_norm)
        self.conv3 = conv(inner, out_channels, 1)
        self.dropout = dropout_layer(self.dropout_p)
        self.add_shortcut()

    @property
    def last_residual_conv(self) -> nn.Conv2d:
        return self.conv3

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(self.bn1(x)))
        x = self.conv2(F.relu(self.bn2(x)))
        x = self.dropout(self.conv3(F.relu(self.bn3(x))))
        return repeat2x(x) if self.upsample else x


BLOCKS: dict[str, type[Block]] = {"simple": SimpleBlock, "basic": BasicBlock,
                                  "bottleneck": BottleneckBlock}
