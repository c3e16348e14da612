"""Long skips: how encoder features cross to the decoder at the same resolution.

Each long skip has two halves. ``transfer(encoder)`` runs right after its encoder stage and returns
the tensor that is held and carried across the network (the *skip path*); ``forward(decoder,
transferred)`` runs just before its decoder stage and merges the two. A forward pre-hook on a skip
module therefore sees exactly what crossed: ``args == (decoder, transferred)``.

Every merge returns ``encoder_channels`` channels, so the decoder blocks are the same for ``sum``,
``concat``, ``sat``, ``at`` and ``st`` and only the skip modules differ.

- ``sum`` (Drozdzal et al.): ``decoder' + encoder``, where ``decoder'`` is a 1×1 conv of the decoder
  features when the channel counts differ, else the decoder features themselves.
- ``concat`` (U-Net style): 1×1 conv of ``[decoder, encoder]`` (concatenated along channels).
- ``sat`` (select-attend-transfer, Taghanaki et al. 2019): *select* multiplies each encoder channel
  by a learned weight (initialised to 1, L1-penalised through :meth:`sparsity_loss`); *attend* maps
  the selected channels to one channel with a 1×1 conv and a sigmoid (a spatial attention map in
  (0, 1)); *transfer* carries only that single map, which the decoder merges as U-Net merges a
  skip: 1×1 conv of ``[decoder, map]``. The decoder thus learns per channel how much to trust the
  map, and the skip holds 1 channel instead of C.
- ``at``: attention map computed from the unselected encoder features (no selection weights).
- ``st``: selected channels, no attention — C channels cross, merged like ``concat``.
"""

from __future__ import annotations

import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.models.blocks import conv

LONG_SKIPS = ("sum", "concat", "sat", "at", "st", "none")


class ChannelSelect(nn.Module):
    """Soft channel selection: ``x * weight`` per channel; ``weight`` starts at 1 (all selected)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class Attend(nn.Module):
    """Spatial attention map: sigmoid of a 1×1 conv to a single channel, values in (0, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


class SumSkip(nn.Module):
    """The paper's long skip: encoder features added to the decoder features."""

    def __init__(self, decoder_channels: int, encoder_channels: int):
        super().__init__()
        self.out_channels = encoder_channels
        self.conv = conv(decoder_channels, encoder_channels, 1) if decoder_channels != encoder_channels else None

    def transfer(self, encoder: torch.Tensor) -> torch.Tensor:
        return encoder

    def forward(self, decoder: torch.Tensor, transferred: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            decoder = self.conv(decoder)
        return decoder + transferred

    def sparsity_loss(self) -> torch.Tensor | None:
        return None


class ConcatSkip(nn.Module):
    """U-Net long skip: concatenate encoder and decoder features, then a 1×1 conv."""

    def __init__(self, decoder_channels: int, encoder_channels: int):
        super().__init__()
        self.out_channels = encoder_channels
        self.conv = conv(decoder_channels + encoder_channels, encoder_channels, 1)

    def transfer(self, encoder: torch.Tensor) -> torch.Tensor:
        return encoder

    def forward(self, decoder: torch.Tensor, transferred: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([decoder, transferred], dim=1))

    def sparsity_loss(self) -> torch.Tensor | None:
        return None


class SelectAttendTransferSkip(nn.Module):
    """SAT and its ablations: ``select`` and/or ``attend`` on the encoder side, concat + 1×1 conv
    on the decoder side. With both off it would equal :class:`ConcatSkip`."""

    def __init__(self, decoder_channels: int, encoder_channels: int, *, select: bool = True,
                 attend: bool = True):
        super().__init__()
        self.out_channels = encoder_channels
        self.select = ChannelSelect(encoder_channels) if select else None
        self.attend = Attend(encoder_channels) if attend else None
        transferred_channels = 1 if attend else encoder_channels
        self.conv = conv(decoder_channels + transferred_channels, encoder_channels, 1)

    def transfer(self, encoder: torch.Tensor) -> torch.Tensor:
        x = encoder
        if self.select is not None:
            x = self.select(x)
        if self.attend is not None:
            x = self.attend(x)
        return x

    def forward(self, decoder: torch.Tensor, transferred: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([decoder, transferred], dim=1))

    def sparsity_loss(self) -> torch.Tensor | None:
        """L1 norm of the selection weights (sum of |w|), or None without selection."""
        return self.select.weight.abs().sum() if self.select is not None else None


def long_skip(kind: str, decoder_channels: int, encoder_channels: int) -> nn.Module | None:
    """The merge module for ``kind`` (one of :data:`LONG_SKIPS`); None for ``"none"``."""
    if kind == "sum":
        return SumSkip(decoder_channels, encoder_channels)
    if kind == "concat":
        return ConcatSkip(decoder_channels, encoder_channels)
    if kind in ("sat", "at", "st"):
        return SelectAttendTransferSkip(decoder_channels, encoder_channels,
                                        select=kind != "at", attend=kind != "st")
    if kind == "none":
        return None
    raise GradflowError(f"unknown long_skip {kind!r}; choose one of {', '.join(LONG_SKIPS)}")
