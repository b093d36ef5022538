"""float16 with and without the CPU's F16C instructions (kernels.c: F16C_CHUNKS).

Where the CPU has F16C the float16 passes convert eight values an instruction each way
(vcvtph2ps, vcvtps2ph rounding to nearest even); without it, by bit operations. Both must give
the same numbers: here a second library is built with ``-mno-f16c`` (in a subprocess with its
own private cache folder) and its float16 outputs are compared with this process's, bit for bit
for every element-wise output (the same formula on the same values, rounded once) and within
float rounding for the sums (added in another order; an output made from such sums inside a
pass, the row passes', within a unit in the last place). Slow: one extra build of the kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from normlab import _kernels

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _kernels.available(), reason=_kernels.status())]

# the float16 passes on fixed values (cf layout, rows long enough for the eight-value steps and
# a tail), their outputs by name; run in both processes
PASSES = """
import torch
from normlab import _kernels
from normlab._kernels import evonorm as ev, elementwise as ew

def outputs():
    g = torch.Generator().manual_seed(5)
    n, c, l = 3, 5, 203
    x = (torch.randn(n, c, l, generator=g, dtype=torch.float64) * 3 + 1).half()
    dy = torch.randn(n, c, l, generator=g, dtype=torch.float64).half()
    m, s, b, a, k = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(5))
    v = torch.randn(c, generator=g, dtype=torch.float64)
    out = {}
    out["moments"] = torch.stack(_kernels.moments(x, "cf"))
    y = torch.empty_like(x); _kernels.affine(x, y, "cf", m, s, b); out["affine"] = y
    y = torch.empty_like(x); _kernels.affine(x, y, "cf", m, s, b, act=_kernels.Epilogue(2, 0.0)); out["affine_silu"] = y
    out["reduce"] = torch.stack(_kernels.reduce(dy, x, "cf", m))
    kept = torch.empty_like(x)
    out["reduce_silu"] = torch.stack(_kernels.reduce(dy, x, "cf", m, act=_kernels.Epilogue(2, 0.0), scale=s, shift=b,
                                                     keep=kept))
    out["kept_silu"] = kept
    y = torch.empty_like(x); _kernels.dx(dy, x, y, "cf", m, a, b, k); out["dx"] = y
    y = torch.empty_like(x); ev.evonorm_forward("s0", x, y, "cf", v, None, None, s, b); out["evos0_fwd"] = y
    kept = torch.empty_like(x); out["evos0_red"] = ev.evonorm_reduce("s0", dy, x, "cf", v, None, None, keep=kept)
    out["evos0_kept"] = kept
    y = torch.empty_like(x); ew.squash_forward(x, y, "cf", "tanh", 0.7, 0.1, None, None); out["dyt_fwd"] = y
    y = torch.empty_like(x)
    w_g, b_g, a_g, s_g = ew.squash_backward(dy, x, y, "cf", "tanh", 0.7, 0.1, None)
    out["dyt_dx"], out["dyt_sums"] = y, torch.cat([w_g, b_g, torch.tensor([a_g, s_g], dtype=torch.float64)])
    rows, drows = x.view(-1, l)[:, :67].contiguous(), dy.view(-1, l)[:, :67].contiguous()  # (15, 67): C with a tail
    w = torch.randn(67, generator=g)
    y, dx = torch.empty_like(rows), torch.empty_like(rows)  # Dynamic tanh on (M, C) rows
    ew.squash_forward(rows, y, "cl", "tanh", 0.7, 0.1, w, None)
    w_g, b_g, a_g, s_g = ew.squash_backward(drows, rows, dx, "cl", "tanh", 0.7, 0.1, w)
    out["dyt_rows_fwd"], out["dyt_rows_dx"] = y, dx
    out["dyt_rows_sums"] = torch.cat([w_g, b_g, torch.tensor([a_g, s_g], dtype=torch.float64)])
    for center in (True, False):
        y, dx = torch.empty_like(rows), torch.empty_like(rows)
        mean, rstd = _kernels.rows_forward(rows, y, 1e-5, w, None, center)
        dw, _ = _kernels.rows_backward(drows, rows, dx, w, mean, rstd, True)
        out[f"rows{int(center)}_fwd"], out[f"rows{int(center)}_dx"], out[f"rows{int(center)}_dw"] = y, dx, dw
    # channels-last (N, L, C) with C = 67: two blocks of 32 channels and a part one, rows of 67
    x = (torch.randn(n, 41, 67, generator=g, dtype=torch.float64) * 3 + 1).half()
    dy = torch.randn(n, 41, 67, generator=g, dtype=torch.float64).half()
    m, s, b, a, k = (torch.randn(n, 67, generator=g, dtype=torch.float64) for _ in range(5))
    v, dstd, istd = (torch.randn(67, generator=g, dtype=torch.float64),
                     torch.rand(1, 67, generator=g, dtype=torch.float64) + 0.5,
                     torch.rand(n, 67, generator=g, dtype=torch.float64) + 0.5)
    out["cl_moments"] = torch.stack(_kernels.moments(x, "cl"))
    relu, silu = _kernels.Epilogue(1, 0.0), _kernels.Epilogue(2, 0.0)
    y = torch.empty_like(x); _kernels.affine(x, y, "cl", m, s, b); out["cl_affine"] = y
    y = torch.empty_like(x); _kernels.affine(x, y, "cl", m, s, b, act=silu); out["cl_affine_silu"] = y
    out["cl_reduce"] = torch.stack(_kernels.reduce(dy, x, "cl", m))
    y = torch.empty_like(x); _kernels.dx(dy, x, y, "cl", m, a, b, k); out["cl_dx"] = y
    y = torch.empty_like(x); _kernels.dx(dy, x, y, "cl", m, a, b, k, act=relu, scale=s, shift=b); out["cl_dx_relu"] = y
    y = torch.empty_like(x)
    out["cl_reduce_silu"] = torch.stack(_kernels.reduce(dy, x, "cl", m, act=silu, scale=s, shift=b, keep=y))
    _kernels.dx(dy, x, y, "cl", m, a, b, k, act=silu, scale=s, shift=b, kept=True); out["cl_dx_silu_kept"] = y
    tlu = _kernels.Epilogue(4, 0.0, torch.randn(67, generator=g, dtype=torch.float64))
    out["cl_reduce_tlu"] = torch.stack(_kernels.reduce(dy, x, "cl", m, act=tlu, scale=s, shift=b))
    y = torch.empty_like(x); _kernels.affine(x, y, "cl", m, s, b, act=tlu); out["cl_affine_tlu"] = y
    for kind, d_, i_ in (("b0", dstd, istd), ("s0", None, None)):
        y = torch.empty_like(x); ev.evonorm_forward(kind, x, y, "cl", v, d_, i_, s, b); out[f"cl_ev{kind}_fwd"] = y
        out[f"cl_ev{kind}_red"] = ev.evonorm_reduce(kind, dy, x, "cl", v, d_, i_)
        y = torch.empty_like(x); ev.evonorm_dx(kind, dy, x, y, "cl", v, d_, i_, a, b, m, k); out[f"cl_ev{kind}_dx"] = y
    y = torch.empty_like(x)
    out["cl_evs0_red_kept"] = ev.evonorm_reduce("s0", dy, x, "cl", v, None, None, keep=y)
    ev.evonorm_dx("s0", dy, x, y, "cl", v, None, None, a, b, m, None, kept=True); out["cl_evs0_dx_kept"] = y
    return out
"""

OTHER = """
import sys
from normlab._kernels import _build
_build._FLAGS = _build._FLAGS + ["-mno-f16c"]
from normlab import _kernels
assert _kernels.available(), _kernels.status()
assert not _kernels.f16c(), "built with -mno-f16c, the library says it converts with F16C"
torch.save(outputs(), sys.argv[1])
"""


def test_float16_without_f16c_gives_the_same_numbers(tmp_path: Path):
    if not _kernels.f16c():
        pytest.skip("the kernels here convert float16 without F16C already: nothing to compare")
    scope: dict = {}
    exec(textwrap.dedent(PASSES), scope)
    ours = scope["outputs"]()
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir(mode=0o700)
    env = {**os.environ, "NORMLAB_CACHE": str(tmp_path / "cache"), "HOME": str(home), "TMPDIR": str(tmp)}
    saved = tmp_path / "other.pt"
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(PASSES) + textwrap.dedent(OTHER), str(saved)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    theirs = torch.load(saved)
    assert ours.keys() == theirs.keys()
    for name, mine in ours.items():
        other = theirs[name]
        if mine.dtype == torch.float16:  # element-wise outputs: bit for bit
            # (but the row passes', whose coefficients come from sums the kernel adds up itself, in
            # another order: a unit in the last place)
            ulps = 1 if name.startswith("rows") else 0
            diff = (mine.view(torch.int16).int() - other.view(torch.int16).int()).abs()
            assert (diff <= ulps).all(), f"{name}: {(diff > ulps).sum().item()} of {diff.numel()} values differ"
        else:  # sums: another order of additions
            torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-4, msg=name)
