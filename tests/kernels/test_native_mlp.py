"""The native one-row MLP (prerank.kernels.mlp) against PyTorch: MLP and RankTower's gated network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prerank.kernels import native
from prerank.kernels.mlp import mlp_row
from prerank.layers.gau import MultiHeadGatedNetwork
from prerank.layers.mlp import MLP

pytestmark = pytest.mark.usefixtures("fresh_kernels")
needs_cc = pytest.mark.skipif(
    native.compiler() is None, reason="no C compiler (cc/gcc or $CC): the native kernel cannot be built here"
)


def torch_forward(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(mlp, x)


@needs_cc
@pytest.mark.parametrize(
    ("in_dim", "hidden", "out_dim"), [(112, (128,), 64), (7, (33, 5), 3), (16, (), 9), (20, (6,), None)]
)
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid])
def test_one_row_equals_pytorch(
    in_dim: int, hidden: tuple[int, ...], out_dim: int | None, activation: type[nn.Module]
) -> None:
    """Widths that are not multiples of the 16 vector lanes or of the 4 outputs per step; an MLP that ends in its
    activation; ReLU and sigmoid (DIN's activation unit)."""
    mlp = MLP(in_dim, hidden, out_dim=out_dim, dropout=0.1, activation=activation).eval()
    x = torch.randn(1, in_dim)
    with torch.no_grad():
        assert mlp_row(x, mlp.affine_layers()) is not None
        torch.testing.assert_close(mlp(x), torch_forward(mlp, x))
    assert list(native.cache_dir().glob("mlp-*.so"))


@needs_cc
def test_gated_network_equals_pytorch() -> None:
    net = MultiHeadGatedNetwork(40, (24,), 3, 5, 11).eval()
    x = torch.randn(1, 40)
    with torch.inference_mode():
        gated = torch_forward(net.mlp, x) * torch.sigmoid(torch_forward(net.gate, x))
        torch.testing.assert_close(net(x), gated.view(1, 3, 5))
        torch.testing.assert_close(net(x.expand(2, 40)), gated.expand(2, 15).view(2, 3, 5))  # PyTorch's path


@needs_cc
def test_follows_in_place_updates() -> None:
    mlp = MLP(10, (8,), out_dim=4).eval()
    x = torch.randn(1, 10)
    with torch.no_grad():
        before = mlp(x)
        for p in mlp.parameters():
            p.add_(1.0)
        torch.testing.assert_close(mlp(x), torch_forward(mlp, x))
        assert not torch.allclose(mlp(x), before)


def test_other_layers_and_autograd_take_the_pytorch_path() -> None:
    x = torch.randn(1, 6)
    assert MLP(6, (4,), out_dim=2, batch_norm=True).eval().affine_layers() is None
    assert MLP(6, (4,), out_dim=2, activation=nn.Tanh).affine_layers() is None
    assert MLP(6, (4,), out_dim=2, dropout=0.5).train().affine_layers() is None
    mlp = MLP(6, (4,), out_dim=2)
    assert mlp_row(x, mlp.affine_layers()) is None  # gradients on: PyTorch, which can differentiate
    with torch.no_grad():
        assert mlp_row(x.double(), mlp.affine_layers()) is None
        assert mlp_row(x, [(w.double(), b.double(), r) for w, b, r in mlp.affine_layers()]) is None
    out = mlp(x)
    out.sum().backward()
    assert mlp[0].weight.grad is not None


@needs_cc
def test_widths_that_do_not_chain_are_named() -> None:
    mlp, gate = MLP(6, (4,), out_dim=2), MLP(6, (4,), out_dim=3)
    x = torch.randn(1, 6)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"layer 0: weight \(4, 6\) and bias \(4,\) do not take 5 inputs"):
            mlp_row(x[:, :5], mlp.affine_layers())
        with pytest.raises(ValueError, match="the gate has 3 outputs, the MLP 2"):
            mlp_row(x, mlp.affine_layers(), gate.affine_layers())
        with pytest.raises(ValueError, match="one row"):
            mlp_row(x.expand(2, 6), mlp.affine_layers())
