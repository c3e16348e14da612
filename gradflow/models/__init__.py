"""Residual FCNs of Drozdzal et al. 2016: every switch the paper studies is one argument.

    model = gradflow.models.simple_fcn(depth=9, levels=4, width=32, batch_norm=False, short_skip=False)
    model = gradflow.models.paper_fcn(long_skip="sat")      # Table 1, ~11.5M parameters
    logits = model(x)                                       # (N, 1, H, W) -> (N, 1, H, W)
    loss = loss + 1e-4 * model.sparsity_loss()              # SAT channel-selection L1 term
    model.layer_names()                                     # conv layers, input to output
"""

from gradflow.models.blocks import BasicBlock, Block, BottleneckBlock, Shortcut, SimpleBlock
from gradflow.models.fcn import FCN, Stage, paper_fcn, simple_fcn
from gradflow.models.naming import stage_of
from gradflow.models.skips import (LONG_SKIPS, ConcatSkip, SelectAttendTransferSkip, SumSkip)

__all__ = ["simple_fcn", "paper_fcn", "stage_of", "FCN", "Stage", "Block", "SimpleBlock",
           "BasicBlock", "BottleneckBlock", "Shortcut", "SumSkip", "ConcatSkip",
           "SelectAttendTransferSkip", "LONG_SKIPS"]
