"""Fit the coefficients of ``src/normlab/_kernels/mathfn.h`` (float32 exp, tanh, erf).

    python3 benchmarks/fit_mathfn.py

Near-minimax fits in float64 by iteratively reweighted least squares (Lawson weights on the
relative error, the denominator linearised as in Loeb's method), printed as C literals:

- exp(r) on |r| <= ln2/2: ``1 + r + r^2 P(r)``, P of degree 4 (exp(r) - 1 - r fitted);
- tanh(x) and erf(x): ``x P(t) / Q(t)``, t = x^2, on [0, X] where X is the clamp beyond which
  float32 rounds the function to +-1 (tanh: X = 9, P of degree 4 and Q of degree 5; erf:
  X = 3.92, degrees 5 and 5). Of the degree pairs tried these are the most accurate whose Q
  has only positive coefficients (no pole and zero pair inside the range, which float32
  rounding would expose); see the printed minimum of Q.

For the half types, whose results are rounded to bfloat16 or float16: tanh and erf of lower
degree (``nl_tanhf_half``: degrees 3 and 4 on [0, 9.2]; ``nl_erff_half``: 3 and 3 on [0, 3.5],
erfc(3.5) = 7e-7), and the GELU (``nl_gelu_half``, ``nl_gelu_grad_half``; polynomials only, no
division):

- 2^r on |r| <= 1/2: ``1 + r P(r)``, P of degree 3;
- log2 Phi(-t), the standard normal's lower tail, on [0, 6]: a polynomial of degree 7 in t
  (error relative to Phi(-t)); its leading coefficient is negative and its derivative has no
  positive root, so that it keeps falling beyond the range (checked here);
- K(t) = 1 - t phi(t) / Phi(-t) as (t0 - t) R(t), t0 its root (0.7518: GELU'(-t0) = 0) rounded
  to float32, R of degree 5 fitted on [0, 6] with relative error: GELU'(v) is Phi(-t) K(t) for
  v = -t < 0 (so relative accuracy up to that zero) and 1 - Phi(-t) K(t) for v = t >= 0.

The float32 accuracy of the result (with these literals) is what ``tests/test_mathfn.py``
measures against float64 torch; this script only reports the fitted float64 error.
"""

from __future__ import annotations

import math

import numpy as np


def lawson(a: np.ndarray, b: np.ndarray, rounds: int = 200) -> np.ndarray:
    """Coefficients c minimising max |a c - b| (rows pre-scaled to relative error)."""
    w = np.full(len(b), 1.0 / len(b))
    c = None
    for _ in range(rounds):
        sw = np.sqrt(w)
        c = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)[0]
        err = np.abs(a @ c - b)
        w = w * err
        w /= w.sum()
    return c


def fit_exp() -> np.ndarray:
    r = np.cos(np.linspace(0, math.pi, 4000)) * math.log(2) / 2
    target = (np.expm1(r) - r) / r**2  # P(r); relative error of exp is about r^2 * that of P
    r, target = r[r != 0], target[r != 0]
    a = np.vander(r, 5, increasing=True)
    scale = r**2 / np.exp(r)  # error of exp relative to exp(r)
    c = lawson(a * scale[:, None], target * scale)
    return c


def fit_rational(f, xmax: float, deg_p: int, deg_q: int) -> tuple[np.ndarray, np.ndarray]:
    x = xmax * (1 - np.cos(np.linspace(0, math.pi / 2, 6000)))  # dense near 0 and near xmax
    x = x[x > 0]
    t = x * x
    g = f(x) / x
    q_prev = np.ones_like(t)
    for _ in range(30):
        # P(t) - g (1 + q1 t + ...) = 0, error relative to g Q_prev
        a = np.hstack([np.vander(t, deg_p + 1, increasing=True),
                       -g[:, None] * np.vander(t, deg_q + 1, increasing=True)[:, 1:]])
        scale = 1.0 / (g * q_prev)
        c = lawson(a * scale[:, None], g * scale, rounds=60)
        p, q = c[: deg_p + 1], np.concatenate([[1.0], c[deg_p + 1:]])
        q_prev = np.polyval(q[::-1], t)
    print(f"  min of Q on the range {np.polyval(q[::-1], t).min():.3g}")
    rel = np.abs(x * np.polyval(p[::-1], t) / np.polyval(q[::-1], t) / f(x) - 1)
    print(f"  fitted max relative error {rel.max():.3g}")
    return p, q


def fit_gelu_half() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.special import log_ndtr, ndtr

    r = np.cos(np.linspace(0, math.pi, 4000)) / 2
    r = r[r != 0]
    e = lawson(np.vander(r, 4, increasing=True) * (r / np.exp2(r))[:, None], (np.exp2(r) - 1) / np.exp2(r))
    t = 6.0 * (1 - np.cos(np.linspace(0, math.pi, 8000))) / 2
    a = np.vander(t, 8, increasing=True)
    p = lawson(a, log_ndtr(-t) / math.log(2), rounds=400)
    print(f"  2^r: fitted max relative error {np.abs(1 + r * np.polyval(e[::-1], r) - np.exp2(r)).max():.3g}")
    print(f"  Phi(-t): fitted max relative error {math.log(2) * np.abs(a @ p - log_ndtr(-t) / math.log(2)).max():.3g}")
    slope_roots = [z for z in np.roots(np.polyder(p[::-1])) if abs(z.imag) < 1e-12 and z.real > 0]
    assert p[-1] < 0 and not slope_roots, "log2 Phi(-t) fit must keep falling beyond its range"
    from scipy.optimize import brentq

    def k_of(t):
        return 1 - t * np.exp(-t * t / 2) / math.sqrt(2 * math.pi) / ndtr(-t)

    t0 = float(np.float32(brentq(k_of, 0.5, 1.0)))
    t = t[np.abs(t - t0) > 1e-9]
    r = k_of(t) / (t0 - t)
    a = np.vander(t, 6, increasing=True)
    k = lawson(a / r[:, None], np.ones_like(t), rounds=3000)
    print(f"  K: root t0 = {t0:.9g}, R's fitted max relative error {np.abs(a @ k / r - 1).max():.3g}")
    return e, p, k


def show(name: str, c: np.ndarray) -> None:
    print(f"{name}: " + ", ".join(f"{np.float32(v).item():.9g}f" for v in c))


def main() -> None:
    from scipy.special import erf

    show("exp P", fit_exp())
    rationals = [  # (what, name, range end, degrees of P and Q)
        ("tanh on [0, 9]", "tanh", 9.0, 4, 5),
        ("erf on [0, 3.92]", "erf", 3.92, 5, 5),
        ("half-precision tanh on [0, 9.2] (nl_tanhf_half)", "tanh", 9.2, 3, 4),
        ("half-precision erf on [0, 3.5] (nl_erff_half)", "erf", 3.5, 3, 3),
    ]
    for label, name, xmax, deg_p, deg_q in rationals:
        print(label)
        p, q = fit_rational(np.tanh if name == "tanh" else erf, xmax, deg_p, deg_q)
        show(f"{name} P", p)
        show(f"{name} Q", q)
    print("half-precision GELU")
    e, p, k = fit_gelu_half()
    show("2^r P", e)
    show("log2 Phi(-t)", p)
    show("R", k)


if __name__ == "__main__":
    main()
