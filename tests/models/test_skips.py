"""Long skips: merges against hand formulas, SAT carries one channel, the sparsity term trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradflow.errors import GradflowError
from gradflow.models import ConcatSkip, SelectAttendTransferSkip, SumSkip, simple_fcn
from gradflow.models.skips import long_skip


def conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1×1 conv written out: sum over input channels of w[o, i] · x[i] + b[o]."""
    w, b = conv.weight.detach()[:, :, 0, 0], conv.bias.detach()
    return torch.einsum("oi,nihw->nohw", w, x) + b.view(1, -1, 1, 1)


def test_sum_adds_encoder_to_decoder():
    decoder, encoder = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    same = SumSkip(4, 4)
    assert same.conv is None
    assert torch.equal(same(decoder, same.transfer(encoder)), decoder + encoder)
    wider = SumSkip(6, 4)  # decoder side has 6 channels: 1×1 conv on the decoder side
    decoder6 = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(wider(decoder6, wider.transfer(encoder)), conv1x1(decoder6, wider.conv) + encoder)


def test_concat_then_1x1_conv():
    decoder, encoder = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    skip = ConcatSkip(6, 4)
    expected = conv1x1(torch.cat([decoder, encoder], dim=1), skip.conv)
    torch.testing.assert_close(skip(decoder, skip.transfer(encoder)), expected)
    assert expected.shape[1] == 4


def test_sat_transfers_the_attention_map_of_the_selected_channels():
    decoder, encoder = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    skip = SelectAttendTransferSkip(6, 4)
    with torch.no_grad():
        skip.select.weight.copy_(torch.tensor([0.5, 0.0, -2.0, 1.0]))
    selected = encoder * torch.tensor([0.5, 0.0, -2.0, 1.0]).view(1, 4, 1, 1)
    attention = torch.sigmoid(conv1x1(selected, skip.attend.conv))
    transferred = skip.transfer(encoder)
    assert transferred.shape == (2, 1, 8, 8)
    torch.testing.assert_close(transferred, attention)
    torch.testing.assert_close(skip(decoder, transferred),
                               conv1x1(torch.cat([decoder, attention], dim=1), skip.conv))


def test_at_and_st_ablations():
    encoder = torch.randn(2, 4, 8, 8)
    at = long_skip("at", 6, 4)
    assert at.select is None
    torch.testing.assert_close(at.transfer(encoder), torch.sigmoid(conv1x1(encoder, at.attend.conv)))
    st = long_skip("st", 6, 4)
    assert st.attend is None
    with torch.no_grad():
        st.select.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(st.transfer(encoder), encoder * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1))
    assert st.conv.in_channels == 6 + 4


@pytest.mark.parametrize("kind,channels", [("sat", 1), ("at", 1), ("st", 8), ("sum", 8), ("concat", 8)])
def test_what_crosses_each_long_skip(kind, channels):
    """A pre-hook on every skip module sees (decoder, transferred); for sat/at the transferred tensor
    has one channel, and it is what the decoder-side 1×1 conv receives besides the decoder features."""
    model = simple_fcn(depth=1, levels=3, width=8, long_skip=kind)
    crossed, merged_inputs = {}, {}
    for i, skip in enumerate(model.skips(), start=1):
        skip.register_forward_pre_hook(lambda m, args, i=i: crossed.__setitem__(i, args))
        if skip.conv is not None:
            skip.conv.register_forward_pre_hook(lambda m, args, i=i: merged_inputs.__setitem__(i, args[0]))
    model(torch.randn(2, 1, 16, 16))
    assert sorted(crossed) == [1, 2, 3]
    for i, (decoder, transferred) in crossed.items():
        assert transferred.shape[1] == channels
        assert transferred.shape[-2:] == decoder.shape[-2:] == (16 // 2 ** (3 - i),) * 2
        if kind in ("sat", "at"):
            assert ((transferred > 0) & (transferred < 1)).all()  # a sigmoid map
            torch.testing.assert_close(merged_inputs[i][:, -1:], transferred)  # only it was concatenated
            assert merged_inputs[i].shape[1] == decoder.shape[1] + 1


def test_sparsity_loss_is_l1_of_selection_weights_and_reaches_them():
    model = simple_fcn(depth=1, levels=2, width=4, long_skip="sat")
    selects = [skip.select.weight for skip in model.skips()]
    with torch.no_grad():
        selects[0].copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    # hand: |1| + |-2| + |0.5| + |0| = 3.5 for skip1, and 4 × |1| for skip2 (initialised to 1)
    loss = model.sparsity_loss()
    assert loss.item() == pytest.approx(3.5 + 4.0)
    loss.backward()
    torch.testing.assert_close(selects[0].grad[:3], torch.tensor([1.0, -1.0, 1.0]))  # d|w|/dw = sign(w)
    torch.testing.assert_close(selects[1].grad, torch.ones(4))


def test_sparsity_term_trains_selection_weights_with_the_task_loss():
    torch.manual_seed(0)
    model = simple_fcn(depth=1, levels=2, width=4, long_skip="sat")
    x, y = torch.randn(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    objective = F.binary_cross_entropy_with_logits(model(x), y) + 1e-2 * model.sparsity_loss()
    objective.backward()
    for skip in model.skips():
        grad = skip.select.weight.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert not torch.allclose(grad, torch.full_like(grad, 1e-2))  # the task loss reaches them too


@pytest.mark.parametrize("kind", ["sum", "concat", "at", "none"])
def test_sparsity_loss_is_zero_without_selection(kind):
    loss = simple_fcn(depth=1, levels=2, width=4, long_skip=kind).sparsity_loss()
    assert loss.item() == 0.0 and not loss.requires_grad


def test_unknown_long_skip():
    with pytest.raises(GradflowError, match="long_skip"):
        long_skip("residual", 4, 4)
