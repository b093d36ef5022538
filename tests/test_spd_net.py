"""SPDNet layers (BiMap, ReEig, LogEig) against float64 eigendecomposition references."""

import pytest
import torch

from normlab.functional import bimap, log_eig, re_eig
from normlab.layers import BiMap, LogEig, ReEig


def _spd(batch: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, 3 * n, generator=g, dtype=dtype)
    return a @ a.transpose(-1, -2) / (3 * n) + 0.05 * torch.eye(n, dtype=dtype)


def _reference(p: torch.Tensor, f) -> torch.Tensor:
    s, u = torch.linalg.eigh(p.double())
    return (u * f(s).unsqueeze(-2)) @ u.transpose(-1, -2)


def test_bimap_keeps_spd_and_is_semi_orthogonal() -> None:
    torch.manual_seed(0)
    layer = BiMap(7, 4, dtype=torch.float64)
    x = _spd(16, 7)
    y = layer(x)
    assert y.shape == (16, 4, 4)
    torch.testing.assert_close(y, y.transpose(-1, -2))
    assert torch.linalg.cholesky_ex(y).info.eq(0).all()
    w = layer.weight
    torch.testing.assert_close(w.T @ w, torch.eye(4, dtype=w.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(y, w.T @ x @ w)
    # after an optimizer step W stays on the Stiefel manifold, so the output stays SPD
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).sum().backward()
    opt.step()
    w = layer.weight
    torch.testing.assert_close(w.T @ w, torch.eye(4, dtype=w.dtype), atol=1e-10, rtol=0)
    assert torch.linalg.cholesky_ex(layer(x)).info.eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reeig_and_logeig_match_float64_eigh(dtype: torch.dtype) -> None:
    x = _spd(8, 6, seed=1)
    eps = float(torch.linalg.eigvalsh(x).median())  # some eigenvalues below, some above
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    got = ReEig(eps)(x.to(dtype)).double()
    torch.testing.assert_close(got, _reference(x, lambda s: s.clamp_min(eps)), **tol)
    got = LogEig()(x.to(dtype)).double()
    torch.testing.assert_close(got, _reference(x, torch.log), **tol)
    # exp of LogEig's output is the input again
    torch.testing.assert_close(torch.linalg.matrix_exp(LogEig()(x)), x, atol=1e-10, rtol=1e-8)


def test_gradcheck() -> None:
    x = _spd(3, 5, seed=2).requires_grad_()
    w = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64)).Q.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: bimap(a, b), (x, w))
    assert torch.autograd.gradcheck(log_eig, (x,))
    eps = float(torch.linalg.eigvalsh(x.detach()).median()) * 1.01  # away from a kink
    assert torch.autograd.gradcheck(lambda a: re_eig(a, eps), (x,))
    net = torch.nn.Sequential(BiMap(5, 4, dtype=torch.float64), ReEig(1e-3), LogEig())
    assert torch.autograd.gradcheck(lambda a: net(a), (x,))


def test_bad_input_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"BiMap\(7, 4\): expected 7x7"):
        BiMap(7, 4)(torch.eye(5))
    with pytest.raises(ValueError, match="BiMap: n_out must be <= n_in"):
        BiMap(3, 4)
    with pytest.raises(ValueError, match="ReEig: expected square"):
        ReEig()(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="ReEig: eps must be > 0"):
        ReEig(0.0)
