"""Test-time dropout averaging against hand-run forward passes."""

import pytest
import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.predict import predict


def small_net(dropout: float = 0.5) -> nn.Module:
    """Conv → BN → ReLU → Dropout2d → conv, with BN running statistics far from the batch's own,
    so that BN in train mode would give visibly different outputs than BN in eval mode."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    layers.append(nn.Conv2d(6, 1, 1))
    net = nn.Sequential(*layers)
    net[1].running_mean.fill_(0.7)
    net[1].running_var.fill_(3.0)
    return net


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_mean_of_dropout_passes_equals_manual_passes():
    net, x = small_net(), images()
    net.train()
    torch.manual_seed(42)
    got = predict(net, x, passes=4)

    net.eval()
    net[3].train()  # dropout sampling, BN on its running statistics
    torch.manual_seed(42)
    with torch.no_grad():
        manual = sum(torch.sigmoid(net(x)) for _ in range(4)) / 4
    torch.testing.assert_close(got, manual, rtol=0, atol=1e-7)

    net.eval()
    with torch.no_grad():
        plain = torch.sigmoid(net(x))
        net[1].train()
        torch.manual_seed(42)
        bn_train = sum(torch.sigmoid(net(x)) for _ in range(4)) / 4
    assert not torch.allclose(got, plain, atol=1e-3)  # the passes really dropped channels
    assert not torch.allclose(got, bn_train, atol=1e-3)  # and BN really stayed in eval mode


def test_one_pass_and_no_dropout_are_plain_eval():
    for net, passes in ((small_net(), 1), (small_net(dropout=0.0), 5)):
        x = images()
        net.eval()
        with torch.no_grad():
            expected = torch.sigmoid(net(x))
        net.train()
        torch.testing.assert_close(predict(net, x, passes=passes), expected, rtol=0, atol=1e-7)


def test_modes_restored_and_output_shape():
    net, x = small_net(), images()
    net.train()
    out = predict(net, x, passes=3)
    assert all(m.training for m in net.modules())
    net.eval()
    predict(net, x, passes=3)
    assert not any(m.training for m in net.modules())
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_batches_give_the_same_probabilities():
    net, x = small_net(dropout=0.0), images(5)
    torch.testing.assert_close(predict(net, x, batch_size=2), predict(net, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("passes", [0, -1, 1.5])
def test_bad_passes_raise(passes):
    with pytest.raises(GradflowError, match="passes"):
        predict(small_net(), images(), passes=passes)
