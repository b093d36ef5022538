"""Riemannian batch norm for SPD matrices (Brooks et al. 2019) against a float64 scipy
reference written from the paper's equations (affine-invariant metric)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from normlab import SPDBatchNorm
from normlab.functional import spd as FS


def random_spd(n_mats: int, n: int, seed: int = 0, cond: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_mats, n, n))
    return a @ a.transpose(0, 2, 1) / n + cond * np.eye(n)


# ---- float64 reference, from the paper (never from normlab) -------------------------
# matrix functions of symmetric matrices via numpy's eigh; cross-checked against scipy's
# sqrtm / logm / expm / fractional_matrix_power in test_reference_matrix_functions
def mfun(a: np.ndarray, f) -> np.ndarray:
    s, u = np.linalg.eigh((a + a.T) / 2)
    return (u * f(s)) @ u.T


def msqrt(a):
    return mfun(a, np.sqrt)


def minvsqrt(a):
    return mfun(a, lambda s: 1 / np.sqrt(s))


def mlog(a):
    return mfun(a, np.log)


def mexp(a):
    return mfun(a, np.exp)


def mpow(a, t):
    return mfun(a, lambda s: s**t)


def ref_karcher(p: np.ndarray, steps: int) -> np.ndarray:
    g = p.mean(0)
    for _ in range(steps):
        gs, gi = msqrt(g), minvsqrt(g)
        tangent = np.mean([gs @ mlog(gi @ pi @ gi) @ gs for pi in p], axis=0)  # mean of Log_G(P_i)
        g = gs @ mexp(gi @ tangent @ gi) @ gs  # Exp_G
    return g


def ref_geodesic(a, b, t):
    return msqrt(a) @ mpow(minvsqrt(a) @ b @ minvsqrt(a), t) @ msqrt(a)


def ref_bn(p: np.ndarray, mean: np.ndarray, bias: np.ndarray) -> np.ndarray:
    bi, gs = minvsqrt(mean), msqrt(bias)
    return np.stack([gs @ bi @ pi @ bi @ gs for pi in p])


def is_spd(y: torch.Tensor) -> bool:
    sym = torch.allclose(y, y.transpose(-1, -2), atol=1e-6)
    return sym and bool((torch.linalg.eigvalsh(y) > 0).all())


# ---- tests -----------------------------------------------------------------------------
def test_reference_matrix_functions():
    a = random_spd(1, 4, seed=20, cond=0.3)[0]
    np.testing.assert_allclose(msqrt(a), sl.sqrtm(a).real, atol=1e-10)
    np.testing.assert_allclose(mlog(a), sl.logm(a).real, atol=1e-10)
    np.testing.assert_allclose(mexp(mlog(a)), sl.expm(sl.logm(a).real), atol=1e-10)
    np.testing.assert_allclose(mpow(a, 0.3), sl.fractional_matrix_power(a, 0.3).real, atol=1e-10)


@pytest.mark.parametrize("steps", [1, 3])
def test_train_matches_reference_and_running_mean_moves_on_geodesic(steps):
    p = random_spd(7, 4, seed=1)
    layer = SPDBatchNorm(4, momentum=0.1, karcher_steps=steps, dtype=torch.float64)
    s = np.random.default_rng(2).standard_normal((4, 4)) * 0.3
    with torch.no_grad():
        layer.bias_log.copy_(torch.from_numpy(s))
    bias = sl.expm((s + s.T) / 2)  # scipy: Pade, not an eigendecomposition
    np.testing.assert_allclose(layer.bias.detach().numpy(), bias, atol=1e-10)
    y = layer(torch.from_numpy(p))
    b = ref_karcher(p, steps)
    np.testing.assert_allclose(y.detach().numpy(), ref_bn(p, b, bias), atol=1e-8, rtol=1e-8)
    run1 = ref_geodesic(np.eye(4), b, 0.1)
    np.testing.assert_allclose(layer.running_mean.numpy(), run1, atol=1e-10)
    # second step: running <- running #_0.1 B2
    p2 = random_spd(5, 4, seed=3, cond=0.5)
    layer(torch.from_numpy(p2))
    np.testing.assert_allclose(layer.running_mean.numpy(), ref_geodesic(run1, ref_karcher(p2, steps), 0.1), atol=1e-9)
    assert int(layer.num_batches_tracked) == 2
    # eval centres on the running mean and leaves it alone
    layer.eval()
    run = layer.running_mean.clone()
    y = layer(torch.from_numpy(p))
    np.testing.assert_allclose(y.detach().numpy(), ref_bn(p, run.numpy(), bias), atol=1e-8)
    assert torch.equal(layer.running_mean, run)


def test_one_karcher_step_is_exact_for_commuting_matrices():
    # for commuting matrices the Karcher mean is expm(mean logm P_i); one step reaches it
    d = np.random.default_rng(0).uniform(0.2, 5.0, size=(6, 3))
    q = sl.qr(np.random.default_rng(1).standard_normal((3, 3)))[0]
    p = np.stack([q @ np.diag(di) @ q.T for di in d])
    g = FS.karcher_mean(torch.from_numpy(p), steps=1)
    expected = q @ np.diag(np.exp(np.log(d).mean(0))) @ q.T
    np.testing.assert_allclose(g.numpy(), expected, atol=1e-10)


def test_karcher_flow_converges_to_the_frechet_mean():
    p = random_spd(8, 3, seed=4, cond=0.2)
    g = FS.karcher_mean(torch.from_numpy(p), steps=30).numpy()
    gi = minvsqrt(g)
    grad = np.mean([mlog(gi @ pi @ gi) for pi in p], axis=0)  # Riemannian gradient at the minimizer
    assert np.abs(grad).max() < 1e-9
    # and the normalized batch is centred at the identity
    layer = SPDBatchNorm(3, karcher_steps=30, dtype=torch.float64)
    y = layer(torch.from_numpy(p)).detach()
    np.testing.assert_allclose(FS.karcher_mean(y, steps=30).numpy(), np.eye(3), atol=1e-9)


def test_outputs_are_spd_in_float32_train_and_eval():
    p = torch.from_numpy(random_spd(16, 6, seed=5, cond=0.05)).float()
    layer = SPDBatchNorm(6)
    with torch.no_grad():
        layer.bias_log.normal_(0, 0.5)
    for _ in range(3):
        y = layer(p)
        assert y.dtype == torch.float32 and is_spd(y)
    layer.eval()
    assert is_spd(layer(p))
    assert is_spd(layer.bias.detach())


def test_channels_are_pooled():
    p = torch.from_numpy(random_spd(12, 3, seed=6))
    a, b = SPDBatchNorm(3, dtype=torch.float64), SPDBatchNorm(3, dtype=torch.float64)
    y4 = a(p.view(4, 3, 3, 3))
    y3 = b(p)
    assert y4.shape == (4, 3, 3, 3)
    torch.testing.assert_close(y4.reshape(12, 3, 3), y3)
    torch.testing.assert_close(a.running_mean, b.running_mean)


def test_momentum_none_is_the_inductive_mean():
    p1, p2 = random_spd(4, 3, seed=7), random_spd(4, 3, seed=8)
    layer = SPDBatchNorm(3, momentum=None, dtype=torch.float64)
    layer(torch.from_numpy(p1))
    b1 = ref_karcher(p1, 1)
    np.testing.assert_allclose(layer.running_mean.numpy(), b1, atol=1e-10)  # weight 1/1
    layer(torch.from_numpy(p2))
    np.testing.assert_allclose(layer.running_mean.numpy(), ref_geodesic(b1, ref_karcher(p2, 1), 0.5), atol=1e-9)
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.eye(3, dtype=torch.float64)) and int(layer.num_batches_tracked) == 0


def test_gradcheck_functional():
    x = torch.from_numpy(random_spd(3, 3, seed=9)).requires_grad_()
    bias = torch.from_numpy(random_spd(1, 3, seed=10)[0]).requires_grad_()
    # gradient through the Karcher flow
    f = lambda x, bias: FS.spd_batch_norm(x, None, bias, training=True, detach_mean=False)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, bias))
    # eval: a fixed mean
    run = torch.from_numpy(random_spd(1, 3, seed=11)[0])
    assert torch.autograd.gradcheck(lambda x, b: FS.spd_batch_norm(x, run, b, training=False), (x, bias))


def test_detached_mean_is_a_constant_in_backward():
    # the reference code computes the batch mean under no_grad: the gradient is the one of
    # the eval map with that mean held fixed, and differs from the full gradient
    x = torch.from_numpy(random_spd(5, 3, seed=14)).requires_grad_()
    w = torch.randn(5, 3, 3, dtype=torch.float64)
    (g_detached,) = torch.autograd.grad((FS.spd_batch_norm(x, None, None, detach_mean=True) * w).sum(), x)
    mean = FS.karcher_mean(x.detach(), 1)
    (g_fixed,) = torch.autograd.grad((FS.spd_batch_norm(x, mean, None, training=False) * w).sum(), x)
    torch.testing.assert_close(g_detached, g_fixed)
    (g_full,) = torch.autograd.grad((FS.spd_batch_norm(x, None, None, detach_mean=False) * w).sum(), x)
    assert (g_full - g_detached).abs().max() > 1e-3


def test_gradcheck_layer_through_spd_inputs_and_bias_log():
    layer = SPDBatchNorm(3, dtype=torch.float64, detach_mean=False)
    a = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    s = (0.3 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()

    def f(a, s):
        with torch.no_grad():
            layer.bias_log.copy_(s)
        x = a @ a.transpose(-1, -2) + torch.eye(3, dtype=torch.float64)
        return FS.spd_batch_norm(x, None, FS.expm_sym(s), training=True, detach_mean=False)

    assert torch.autograd.gradcheck(f, (a, s))


def test_matrix_functions_have_finite_gradients_at_repeated_eigenvalues():
    # the running mean and the bias start at the identity: torch.linalg.eigh's backward is
    # undefined there, the divided-difference (Daleckii-Krein) form is not
    eye = torch.eye(3, dtype=torch.float64, requires_grad=True)
    for fn in (FS.sqrtm, FS.invsqrtm, FS.logm, FS.expm_sym, lambda p: FS.powm(p, 0.3)):
        assert torch.autograd.gradcheck(fn, (eye,))
    d = torch.diag(torch.tensor([2.0, 2.0, 0.5], dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(FS.logm, (d,))
    # at I, d logm(I + E) = sym(E)
    e = torch.randn(3, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad(FS.logm(eye), eye, e)
    torch.testing.assert_close(g, (e + e.T) / 2)


def test_training_the_bias_keeps_it_spd_and_fits_a_target():
    layer = SPDBatchNorm(4)
    p = torch.from_numpy(random_spd(8, 4, seed=12)).float()
    target = torch.from_numpy(random_spd(1, 4, seed=15)[0] * 3).float()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((layer(p) - target) ** 2).mean()
        loss.backward()
        assert torch.isfinite(layer.bias_log.grad).all()
        opt.step()
        losses.append(loss.item())
        assert is_spd(layer.bias.detach())
    assert losses[-1] < 0.5 * losses[0]
    # any symmetric bias_log, however large, gives an SPD bias
    with torch.no_grad():
        layer.bias_log.copy_(torch.randn(4, 4) * 2)
    assert is_spd(layer.bias.detach().double())


def test_state_dict_round_trip():
    p = torch.from_numpy(random_spd(8, 3, seed=13))
    a = SPDBatchNorm(3, dtype=torch.float64)
    with torch.no_grad():
        a.bias_log.normal_()
    a(p)
    a(p * 2)
    sd = a.state_dict()
    assert set(sd) == {"bias_log", "running_mean", "num_batches_tracked"}
    b = SPDBatchNorm(3, dtype=torch.float64)
    b.load_state_dict(sd)
    a.eval(), b.eval()
    torch.testing.assert_close(a(p), b(p), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.ones(4, 3, 2), "square"),
        (torch.eye(4).expand(2, 4, 4), r"expected 3x3"),
        (torch.eye(3), r"\(N, n, n\)"),
        (torch.tensor([[[2.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]]).expand(2, 3, 3), "symmetric"),
        (torch.diag(torch.tensor([1.0, -1.0, 1.0])).expand(2, 3, 3), "positive-definite"),
        (torch.zeros(2, 3, 3), "positive-definite"),
        (torch.eye(3, dtype=torch.long).expand(2, 3, 3), "floating-point"),
    ],
)
def test_bad_inputs_raise_and_leave_state_unchanged(bad, match):
    layer = SPDBatchNorm(3)
    layer(torch.from_numpy(random_spd(4, 3)).float())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match) as err:
        layer(bad)
    assert "SPDBatchNorm(3)" in str(err.value)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_constructor_errors():
    with pytest.raises(ValueError, match="n must be"):
        SPDBatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        SPDBatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="karcher_steps"):
        SPDBatchNorm(3, karcher_steps=0)


def test_recalibrate_gives_the_inductive_mean_of_the_batches():
    import normlab

    p1, p2 = random_spd(4, 3, seed=21), random_spd(4, 3, seed=22)
    model = torch.nn.Sequential(SPDBatchNorm(3, dtype=torch.float64)).eval()
    normlab.recalibrate(model, [torch.from_numpy(p1), torch.from_numpy(p2)])
    b1, b2 = ref_karcher(p1, 1), ref_karcher(p2, 1)
    np.testing.assert_allclose(model[0].running_mean.numpy(), ref_geodesic(b1, b2, 0.5), atol=1e-9)
    assert not model.training and model[0].momentum == 0.1
