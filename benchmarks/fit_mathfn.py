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


def show(name: str, c: np.ndarray) -> None:
    print(f"{name}: " + ", ".join(f"{np.float32(v).item():.9g}f" for v in c))


def main() -> None:
    from scipy.special import erf

    show("exp P", fit_exp())
    print("tanh on [0, 9]")
    p, q = fit_rational(np.tanh, 9.0, 4, 5)
    show("tanh P", p)
    show("tanh Q", q)
    print("erf on [0, 3.92]")
    p, q = fit_rational(erf, 3.92, 5, 5)
    show("erf P", p)
    show("erf Q", q)


if __name__ == "__main__":
    main()
