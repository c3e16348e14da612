"""The residual FCN of Drozdzal et al. 2016 and the builders that read like the paper.

Layout for ``levels`` = L encoder stages (``down1`` … ``downL``), input side H (output side in
brackets):

- ``down1``: 3×3 conv, no BN/ReLU on the raw image [H]
- ``down2 … downL``: repeated blocks, the first copy downsamples [H/2 … H/2^(L-1)]
- ``across``: repeated blocks, the first copy downsamples, the last upsamples [H/2^(L-1); H/2^L
  in between]
- ``skip<i>``: long-skip merge into the input of ``up<i>``
- ``up1 … up(L-1)``: mirror of ``downL … down2``, the last copy upsamples [H/2^(L-2) … H]
- ``upL``: BN → ReLU → 3×3 conv, the mirror of ``down1`` [H]
- ``classifier``: 1×1 conv to one channel, logits (the loss applies the sigmoid) [H]

So an input side must be divisible by 2^L (the across stage, as in the authors' code
``veugene/fcn_maker``, works one level below the last encoder stage). ``skip<i>`` carries the
output of ``down<L+1-i>`` (``skip1`` the deepest, ``skipL`` the first conv's features); its
encoder-side half (:meth:`transfer`) runs right after that encoder stage, its merge just before
``up<i>``. Modules are registered in input-to-output order: ``down1 … downL, across, skip1, up1, …,
skipL, upL, classifier``, and within a block the shortcut conv comes after the residual convs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from gradflow.errors import GradflowError
from gradflow.models.blocks import BLOCKS, Block, conv, norm
from gradflow.models.skips import LONG_SKIPS, long_skip as make_long_skip


class Stage(NamedTuple):
    """One row of the paper's Table 1: block type, output width (channels), repetitions."""

    block: str
    width: int
    repeat: int = 1


# Table 1 of Drozdzal et al. 2016 (output resolution for a 512² input). The expanding path
# mirrors it: up1 = bottleneck 512 ×10 (64²), up2 = 256 ×8 (128²), up3 = 128 ×3 (256²),
# up4 = simple 32 (512²), up5 = BN-ReLU-conv 3×3 32 (512²), then the 1×1 classifier.
TABLE_1_DOWN = (
    Stage("conv", 32),               # down1   512²
    Stage("simple", 32),             # down2   256²
    Stage("bottleneck", 128, 3),     # down3   128²
    Stage("bottleneck", 256, 8),     # down4    64²
    Stage("bottleneck", 512, 10),    # down5    32²
)
TABLE_1_ACROSS = Stage("bottleneck", 1024, 3)  # across 32² (16² between its first and last copy)

INITS = ("he", "scaled")


def scale_residual_branches(model: nn.Module) -> int:
    """Multiply the last conv weight of every residual branch that has a short skip by L^(-1/2).

    L is the number of such blocks in ``model``. Without batch norm a He-initialised branch is as
    large as its input, so ``x + branch(x)`` doubles the signal's second moment per block (2^L over
    the net). Scaled by L^(-1/2), each block multiplies it by about (1 + 1/L), at most e ≈ 2.7
    over the whole net. This is the variance argument of Fixup (Zhang et al. 2019), whose
    L^(-1/(2m-2)) rule has no finite value for the one-conv branches of ``simple`` blocks; Fixup's
    bias and multiplier parameters are not added. Blocks without a short skip are left at He init
    (they have no sum to control). Biases are zero, so they need no scaling. Returns L.
    """
    blocks = [m for m in model.modules() if isinstance(m, Block) and m.shortcut is not None]
    with torch.no_grad():
        for block in blocks:
            block.last_residual_conv.weight.mul_(len(blocks) ** -0.5)
    return len(blocks)


class InputConv(nn.Module):
    """``down1``: a plain 3×3 conv on the image."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = conv(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class OutputConv(nn.Module):
    """``upL``: BN → ReLU → 3×3 conv, the last layer before the classifier."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool):
        super().__init__()
        self.bn = norm(in_channels, batch_norm)
        self.conv = conv(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(x)))


def repeated(stage: Stage, in_channels: int, *, downsample: bool, upsample: bool,
             **switches) -> nn.Sequential:
    """``stage.repeat`` blocks named ``block0…``; only the first copy downsamples, only the last
    upsamples."""
    blocks, channels = OrderedDict(), in_channels
    for j in range(stage.repeat):
        blocks[f"block{j}"] = BLOCKS[stage.block](
            channels, stage.width, downsample=downsample and j == 0,
            upsample=upsample and j == stage.repeat - 1, **switches)
        channels = stage.width
    return nn.Sequential(blocks)


class FCN(nn.Module):
    """Contracting path ``down``, centre ``across``, expanding path mirroring ``down``.

    ``down[0]`` must be a ``"conv"`` stage (the first 3×3 conv); the others and ``across`` name a
    block type from :data:`gradflow.models.blocks.BLOCKS`. Input (N, in_channels, H, W) with H and
    W divisible by ``2**levels`` (``levels = len(down)``); output logits (N, 1, H, W).

    ``init``: ``"he"`` (the paper's: He / kaiming normal for every conv) or ``"scaled"`` (He, then
    :func:`scale_residual_branches`, so that nets with short skips and no batch norm do not start
    with exploding activations; a deviation from the paper).
    """

    def __init__(self, down: Sequence[Stage], across: Stage, *, batch_norm: bool = True,
                 short_skip: bool = True, long_skip: str = "sum", dropout: float = 0.0,
                 in_channels: int = 1, init: str = "he"):
        super().__init__()
        check_switches(down, across, long_skip, dropout)
        if init not in INITS:
            raise GradflowError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self.levels, self.in_channels, self.long_skip = len(down), in_channels, long_skip
        switches = dict(batch_norm=batch_norm, short_skip=short_skip, dropout=dropout)

        encoder_channels, channels = [], in_channels
        for i, stage in enumerate(down, start=1):
            module = (InputConv(channels, stage.width) if i == 1 else
                      repeated(stage, channels, downsample=True, upsample=False, **switches))
            self.add_module(f"down{i}", module)
            encoder_channels.append(channels := stage.width)

        self.across = repeated(across, channels, downsample=True, upsample=True, **switches)
        channels = across.width

        for i, stage in enumerate(reversed(down), start=1):
            skip = make_long_skip(long_skip, channels, encoder_channels[-i])
            if skip is not None:
                self.add_module(f"skip{i}", skip)
                channels = skip.out_channels
            module = (OutputConv(channels, stage.width, batch_norm) if i == self.levels else
                      repeated(stage, channels, downsample=False, upsample=True, **switches))
            self.add_module(f"up{i}", module)
            channels = stage.width

        self.classifier = conv(channels, 1, 1)
        if init == "scaled":
            scale_residual_branches(self)

    def skips(self) -> list[nn.Module | None]:
        """Long-skip modules ``skip1 … skipL`` (None each where ``long_skip="none"``)."""
        return [getattr(self, f"skip{i}", None) for i in range(1, self.levels + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = self.skips()
        carried = []  # what each long skip holds, from its encoder stage to its decoder stage
        for i in range(1, self.levels + 1):
            x = getattr(self, f"down{i}")(x)
            skip = skips[self.levels - i]
            carried.append(skip.transfer(x) if skip is not None else None)
        x = self.across(x)
        for i in range(1, self.levels + 1):
            transferred = carried.pop()
            if skips[i - 1] is not None:
                x = skips[i - 1](x, transferred)
            x = getattr(self, f"up{i}")(x)
        return self.classifier(x)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise GradflowError for a wrong input shape, naming the nearest valid size."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise GradflowError(f"expected input of shape (N, {self.in_channels}, H, W), "
                                f"got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        nearest = [nearest_side(side, self.levels) for side in (height, width)]
        if nearest != [height, width]:
            raise GradflowError(
                f"input size {height}×{width} is not divisible by 2**levels = {2 ** self.levels} "
                f"(levels={self.levels}); nearest valid size: {nearest[0]}×{nearest[1]}")

    def sparsity_loss(self) -> torch.Tensor:
        """L1 term of the SAT channel selection summed over long skips; 0. without selection."""
        terms = [t for skip in self.skips() if skip is not None
                 if (t := skip.sparsity_loss()) is not None]
        if not terms:
            return torch.zeros((), device=self.classifier.weight.device)
        return torch.stack(terms).sum()

    def layer_names(self) -> list[str]:
        """Qualified names of all conv layers, in input-to-output (registration) order."""
        return [name for name, module in self.named_modules() if isinstance(module, nn.Conv2d)]


def nearest_side(side: int, levels: int) -> int:
    """The input side nearest to ``side`` that an FCN with ``levels`` levels takes (a multiple of
    2**levels, at least one); ``side`` itself when it is valid."""
    step = 2 ** levels
    return max(step, math.floor(side / step + 0.5) * step)


def check_dropout(dropout: float) -> None:
    """Dropout is a probability in [0, 1)."""
    if not 0.0 <= dropout < 1.0:
        raise GradflowError(f"dropout must be in [0, 1), got {dropout!r}")


def check_switches(down: Sequence[Stage], across: Stage, long_skip: str, dropout: float) -> None:
    if long_skip not in LONG_SKIPS:
        raise GradflowError(f"unknown long_skip {long_skip!r}; choose one of {', '.join(LONG_SKIPS)}")
    check_dropout(dropout)
    if not down or down[0].block != "conv":
        raise GradflowError("the first encoder stage must be the 3×3 'conv' stage")
    for stage in (*down[1:], across):
        if stage.block not in BLOCKS:
            raise GradflowError(f"unknown block {stage.block!r}; choose one of {', '.join(BLOCKS)}")
        if stage.repeat < 1 or stage.width < 1:
            raise GradflowError(f"block repetitions and width must be at least 1, got {stage}")


def paper_fcn(*, batch_norm: bool = True, short_skip: bool = True, long_skip: str = "sum",
              dropout: float = 0.0, init: str = "he", width: int = 32) -> FCN:
    """The Table 1 model of Drozdzal et al. 2016 (levels = 5: inputs divisible by 32, e.g. 512²).

    11,451,745 parameters with the defaults (short skips, ``sum`` long skips, batch norm); the
    authors' implementation counts about 11.5M. See ``reports/skip_cost.md`` for the other long skips.
    ``width``: the first stage's channels (Table 1: 32); every stage's width is scaled by ``width``/32,
    keeping the block types, repetitions and levels: a narrower net of the same depth (widths
    w, w, 4w, 8w, 16w, across 32w).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise GradflowError(f"width must be a positive integer, got {width!r}")
    down = [Stage(s.block, s.width * width // 32, s.repeat) for s in TABLE_1_DOWN]
    across = Stage(TABLE_1_ACROSS.block, TABLE_1_ACROSS.width * width // 32, TABLE_1_ACROSS.repeat)
    return FCN(down, across, batch_norm=batch_norm, short_skip=short_skip,
               long_skip=long_skip, dropout=dropout, init=init)


def simple_fcn(depth: int = 7, levels: int = 4, width: int = 32, *, block: str = "simple",
               batch_norm: bool = True, short_skip: bool = True, long_skip: str = "sum",
               dropout: float = 0.0, init: str = "he") -> FCN:
    """The Fig. 4 family: ``depth`` repetitions of ``block`` per level, ``width`` channels everywhere.

    The width is constant across levels (no doubling): every 3×3 conv then has the same fan-in
    (9·width) and so the same He-init scale, which makes per-layer update magnitudes (Fig. 4's
    mean |W_end − W_start|) comparable along the network, and no shortcut or long-skip needs a
    1×1 channel-matching conv. ``levels`` counts the encoder stages (``down1`` = the first conv,
    ``down2..down<levels>`` = blocks) plus the across stage one level lower: inputs must be
    divisible by ``2**levels``. ``init``: ``"he"`` (the paper's) or ``"scaled"`` (see :class:`FCN`).
    """
    for name, value in (("depth", depth), ("levels", levels), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GradflowError(f"{name} must be a positive integer, got {value!r}")
    if block not in BLOCKS:
        raise GradflowError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
    stage = Stage(block, width, depth)
    return FCN([Stage("conv", width)] + [stage] * (levels - 1), stage, batch_norm=batch_norm,
               short_skip=short_skip, long_skip=long_skip, dropout=dropout, init=init)
