"""CUDA kernels of codeq vs the pure-PyTorch reference and vs the CPU kernels.

Every test here needs a CUDA GPU and is skipped elsewhere (``pytest -m cuda``
selects them).  What is checked (the parity contract of
docs/quantizer-math.md):

- abs_quantile: CUDA == CPU op == reference, bitwise, for the four dtypes,
  shapes from 1 element to millions (and > 2^24, slow), ties, zeros, +-Inf, NaN;
- dead-zone compander: w_hat and dL/dw within the contract (boundary flips
  counted, printed and asserted rare), dL/dlogit_dz and dL/dlogit_bit against
  the float64 reference, for learnable / fixed bit-width and dead zone,
  B = 2..8, theta in [-6, 6], non-contiguous inputs, all-zero, NaN / Inf;
- CUDA op vs CPU op on the same inputs (the scalars may differ by the ulp of
  the device tanh; w_hat within the contract);
- uniform quantizer and multi-tensor group lasso (including > 56 layers, i.e.
  several launches, and mixed dtypes);
- determinism: two backward runs give identical bits;
- torch.library.opcheck of every op on CUDA;
- torch.compile(fullgraph=True) of a small quantized model + group lasso
  matches eager.

``CODEQ_CUDA_TEST_DEVICE=cpu`` runs the same tests on the CPU kernels (a check
of the tests themselves on a machine without a GPU; the CUDA-vs-CPU tests
then compare the CPU op with itself).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import codeq
from codeq import reference

DEVICE = os.environ.get("CODEQ_CUDA_TEST_DEVICE", "cuda")
_RUNNABLE = torch.cuda.is_available() if DEVICE == "cuda" else True

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _RUNNABLE, reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1 .. a few million; 65536 / 65537 straddle the single-block / multi-block switch.
SIZES = [1, 2, 3, 100, 1000, 36_864, 65_536, 65_537, 147_456, 1 << 20, 2_359_296]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps,
       torch.float16: torch.finfo(torch.float16).eps, torch.bfloat16: torch.finfo(torch.bfloat16).eps}
OPS = torch.ops.codeq


@pytest.fixture(scope="module", autouse=True)
def _kernels_present():
    assert codeq._ext.has_kernel(DEVICE), (
        f"codeq has no {DEVICE} kernels: {codeq.info()} -- build the extension with CUDA "
        "(pip install --no-build-isolation . on a machine with nvcc)")


def _gen(seed=0):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def make_weight(n, dtype, kind="gauss", seed=0):
    g = _gen(seed)
    if kind == "gauss":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=g).to(torch.float64) * 0.125
    elif kind == "zero":
        x = torch.zeros(n, dtype=torch.float64)
    elif kind == "inf":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
        x[:: max(1, n // 7)] = math.inf
        x[1 :: max(2, n // 5)] = -math.inf
    elif kind == "outlier":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
        x[n // 2] = 50.0
    else:
        raise ValueError(kind)
    return x.to(dtype).to(DEVICE)


def bits(t):
    t = t.detach().cpu()
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    return t.view(torch.int32)


def assert_bitwise(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    an, bn = torch.isnan(a.detach().cpu()), torch.isnan(b.detach().cpu())
    assert torch.equal(an, bn), f"{what}: NaN positions differ"
    assert torch.equal(bits(a)[~an], bits(b)[~bn]), f"{what}: {a} vs {b} differ in bits"


# ------------------------------------------------------------------ quantile --
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["gauss", "ties", "zero", "inf", "outlier"])
def test_abs_quantile_bitwise(dtype, n, kind):
    x = make_weight(n, dtype, kind, seed=n)
    a_dev = OPS.abs_quantile(x, 0.99)
    a_cpu = OPS.abs_quantile(x.cpu(), 0.99)
    a_ref = reference.abs_quantile(x)
    assert a_dev.device == x.device and a_dev.dim() == 0
    assert a_dev.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_bitwise(a_dev.cpu(), a_cpu, f"cuda vs cpu op (n={n}, {kind})")
    assert_bitwise(a_dev, a_ref.to(a_dev.dtype), f"cuda op vs reference (n={n}, {kind})")


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 7, 65_536, 200_003])
def test_abs_quantile_other_q(q, n):
    x = make_weight(n, torch.float32, "gauss", seed=3)
    assert_bitwise(OPS.abs_quantile(x, q).cpu(), OPS.abs_quantile(x.cpu(), q), f"q={q} n={n}")


@pytest.mark.parametrize("n", [5, 65_536, 300_000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_quantile_nan(n, dtype):
    x = make_weight(n, dtype, "gauss")
    x[n // 3] = float("nan")
    assert torch.isnan(OPS.abs_quantile(x, 0.99)).item()


def test_abs_quantile_noncontiguous():
    x = make_weight(300 * 500, torch.float32).reshape(300, 500).t()[:, ::2]
    assert not x.is_contiguous()
    assert_bitwise(OPS.abs_quantile(x, 0.99).cpu(), OPS.abs_quantile(x.cpu(), 0.99))
    assert_bitwise(OPS.abs_quantile(x, 0.99), reference.abs_quantile(x))


@pytest.mark.slow
def test_abs_quantile_over_2_pow_24():
    n = (1 << 24) + 3
    x = make_weight(n, torch.float32, "gauss", seed=24)
    assert_bitwise(OPS.abs_quantile(x, 0.99).cpu(), OPS.abs_quantile(x.cpu(), 0.99))
    assert_bitwise(OPS.abs_quantile(x, 0.99), reference.abs_quantile(x))


# ----------------------------------------------------------------- dead zone --
def _pair(learnable_bit=True, learnable_dz=True, theta_dz=3.0, theta_bit=3.0, fixed_bit=4, dtype=torch.float32):
    kw = dict(fixed_bit_val=fixed_bit, init_deadzone_logit=theta_dz, init_bit_logit=theta_bit,
              learnable_bit=learnable_bit, learnable_deadzone=learnable_dz)
    fused = codeq.DeadZoneLDZCompander(**kw).to(DEVICE)
    ref = codeq.DeadZoneLDZCompander(**kw, reference=True).to(DEVICE)
    if dtype == torch.float64:
        fused, ref = fused.double(), ref.double()
    return fused, ref


def near_boundary(w, sc, dtype):
    """Elements whose u/s lies within the contract's distance of a k + 0.5 boundary."""
    x = w.detach().to(torch.float64)
    s, delta = float(sc["s"]), float(sc["delta"])
    u = torch.sign(x) * torch.relu(x.abs() - delta) / s
    frac = (u.abs() - u.abs().floor() - 0.5).abs()
    eps = EPS[torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype]
    return frac <= 1e-4 + 4 * eps * x.abs() / s


def compare_within_contract(got, want, w, sc, dtype, what):
    """Every element equal within rtol (the dtype's), except rare boundary flips; returns the flip count."""
    g, r = got.detach().to(torch.float64).cpu(), want.detach().to(torch.float64).cpu()
    rtol = 1e-6 if dtype == torch.float32 else 1e-12 if dtype == torch.float64 else 2 * EPS[dtype]
    both_nan = torch.isnan(g) & torch.isnan(r)
    close = both_nan | (g == r) | ((g - r).abs() <= rtol * r.abs() + 1e-30)
    bad = ~close
    nb = near_boundary(w, sc, dtype).cpu()
    unexplained = bad & ~nb
    flips = int((bad & nb).sum())
    n = g.numel()
    print(f"{what}: n={n} boundary flips={flips}")
    assert int(unexplained.sum()) == 0, (
        f"{what}: {int(unexplained.sum())} elements differ off the rounding boundaries, e.g. "
        f"got {g[unexplained][:5].tolist()} want {r[unexplained][:5].tolist()}")
    assert flips <= max(2, n // 10_000), f"{what}: {flips} boundary flips in {n} elements (must be < 1e-4)"
    return flips


def chain_abs(Ts, Td, sc, theta_dz, theta_bit, learnable_bit, lo=2.0, hi=8.0):
    """Magnitude of the logit gradients built from |terms| (the contract's yardstick)."""
    a, d, Q, B = (float(sc[k]) for k in ("a", "d", "Q", "B"))
    ds = Ts + Td / 2
    dd = Td / 2 + ds / (2 * (Q - 0.5))
    t = math.tanh(theta_dz)
    gdz = dd * abs(2 * a * (1 - t * t))
    gbit = 0.0
    if learnable_bit:
        tb = math.tanh(theta_bit)
        gbit = ds * abs(a - d / 2) / (Q - 0.5) ** 2 * 2 ** (B - 1) * math.log(2) * (hi - lo) * (1 - tb * tb)
    return gdz, gbit


def run_dz(q, w, g):
    w = w.detach().clone().requires_grad_(True)
    for p in (q.logit_dz, q.logit_bit):
        p.grad = None
    w_hat = q(w)
    w_hat.backward(g)
    gdz = q.logit_dz.grad.detach().clone() if q.logit_dz.grad is not None else torch.zeros((), device=w.device)
    gbit = q.logit_bit.grad.detach().clone() if q.logit_bit.grad is not None else torch.zeros((), device=w.device)
    return w_hat.detach(), w.grad.detach(), gdz, gbit


def check_deadzone(w, learnable_bit=True, learnable_dz=True, theta_dz=3.0, theta_bit=3.0, fixed_bit=4, seed=0):
    dtype = w.dtype
    fused, ref = _pair(learnable_bit, learnable_dz, theta_dz, theta_bit, fixed_bit, dtype)
    g = (torch.randn(w.shape, generator=_gen(seed + 1), dtype=torch.float64) * 1e-3).to(dtype).to(w.device)
    wh_f, gw_f, gdz_f, gbit_f = run_dz(fused, w, g)
    wh_r, gw_r, gdz_r, gbit_r = run_dz(ref, w, g)
    assert wh_f.dtype == dtype and wh_f.shape == w.shape and wh_f.device == w.device
    assert gw_f.dtype == dtype and gw_f.shape == w.shape
    sc = ref.get_scalars(w)
    flips = compare_within_contract(wh_f, wh_r, w, sc, dtype, "w_hat")
    compare_within_contract(gw_f, gw_r, w, sc, dtype, "dL/dw")
    if not torch.isfinite(w).all():
        return
    # Logit gradients vs the float64 reference (on the same device).
    ref64 = codeq.DeadZoneLDZCompander(fixed_bit_val=fixed_bit, init_deadzone_logit=theta_dz,
                                       init_bit_logit=theta_bit, learnable_bit=learnable_bit,
                                       learnable_deadzone=learnable_dz, reference=True).to(w.device).double()
    _, _, gdz_64, gbit_64 = run_dz(ref64, w.double(), g.double())
    sc64 = ref64.get_scalars(w.double())
    x = w.double()
    s, delta, Q = float(sc64["s"]), float(sc64["delta"]), float(sc64["Q"])
    u = torch.sign(x) * torch.relu(x.abs() - delta) / s
    qv = torch.clamp(torch.round(u), -Q, Q)
    Ts = float((g.double() * (qv - u)).abs().sum())
    Td = float((g.double() * (torch.sign(qv) - torch.sign(x))).abs().sum())
    bdz, bbit = chain_abs(Ts, Td, sc64, theta_dz, theta_bit, learnable_bit)
    gmax = float(g.double().abs().max())
    fdz, fbit = chain_abs(gmax, gmax, sc64, theta_dz, theta_bit, learnable_bit)  # one flipped element
    for name, got, want64, want32, scale, flip_scale, learnable in (
        ("logit_dz", gdz_f, gdz_64, gdz_r, bdz, fdz, learnable_dz),
        ("logit_bit", gbit_f, gbit_64, gbit_r, bbit, fbit, learnable_bit),
    ):
        if not learnable:
            continue
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        err = abs(float(got) - float(want64))
        allowed = 1e-4 * scale + 4 * abs(float(want32) - float(want64)) + 2 * (flips + 1) * flip_scale + 1e-30
        if dtype in (torch.float16, torch.bfloat16):
            allowed += 4 * EPS[dtype] * scale  # the half-precision input itself
        assert err <= allowed, f"d/d{name}: fused {float(got)} float64 ref {float(want64)} (err {err}, allowed {allowed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_deadzone_parity_sizes(dtype, n):
    check_deadzone(make_weight(n, dtype, "gauss", seed=n))


@pytest.mark.parametrize("B", range(2, 9))
@pytest.mark.parametrize("learnable_dz", [True, False])
def test_deadzone_fixed_bits(B, learnable_dz):
    check_deadzone(make_weight(147_456, torch.float32, seed=B), learnable_bit=False, learnable_dz=learnable_dz,
                   fixed_bit=B)


@pytest.mark.parametrize("theta_dz", [-6.0, -2.0, -0.3, 0.0, 0.5, 3.0, 6.0])
@pytest.mark.parametrize("theta_bit", [-6.0, -1.0, 0.0, 0.7, 6.0])
def test_deadzone_theta_range(theta_dz, theta_bit):
    check_deadzone(make_weight(36_864, torch.float32, seed=7), theta_dz=theta_dz, theta_bit=theta_bit)


@pytest.mark.parametrize("kind", ["zero", "ties", "inf", "outlier"])
@pytest.mark.parametrize("n", [100, 65_537])
def test_deadzone_special_values(kind, n):
    check_deadzone(make_weight(n, torch.float32, kind, seed=1))


@pytest.mark.parametrize("n", [100, 300_000])
def test_deadzone_nan(n):
    w = make_weight(n, torch.float32)
    w[5] = float("nan")
    q = codeq.DeadZoneLDZCompander().to(DEVICE)
    w_hat = q(w)
    assert torch.isnan(w_hat).all()


def test_deadzone_noncontiguous():
    w = make_weight(192 * 768, torch.float32).reshape(192, 768).t()
    assert not w.is_contiguous()
    check_deadzone(w)
    check_deadzone(make_weight(4 * 192 * 768, torch.float32).reshape(4, 192, 768)[:, :, ::4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_deadzone_op_vs_cpu_op(dtype):
    for n in (1000, 147_456, 1 << 20):
        w = make_weight(n, dtype, seed=n)
        for lb in (True, False):
            ldz = torch.tensor(2.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            lbit = torch.tensor(1.2, dtype=ldz.dtype)
            cfg = ([4.0], [2.0], [8.0], [lb], [0.0])
            (wh_d,), _, (sc_d,), _ = OPS.deadzone_forward([w], [ldz.to(DEVICE)], [lbit.to(DEVICE)], *cfg)
            (wh_c,), _, (sc_c,), _ = OPS.deadzone_forward([w.cpu()], [ldz], [lbit], *cfg)
            assert sc_d.dtype == sc_c.dtype and sc_d.shape == (6,)
            assert_bitwise(sc_d[0].cpu(), sc_c[0], "a")  # the quantile: bitwise
            assert float(sc_d[1]) == float(sc_c[1])  # B
            torch.testing.assert_close(sc_d.cpu(), sc_c, rtol=1e-6 if dtype != torch.float64 else 1e-14, atol=0)
            names = codeq.ops.SCALAR_NAMES
            sc = {k: sc_c[i] for i, k in enumerate(names)}
            compare_within_contract(wh_d, wh_c, w.cpu(), sc, dtype, "cuda vs cpu w_hat")
            g = torch.randn(w.shape, generator=_gen(2), dtype=torch.float64).to(dtype)

            def backward(g, w, scalars, dev):
                (gw,), (gdz,), (gbit,) = OPS.deadzone_backward(
                    [g.to(dev)], torch.zeros((), device=dev), [w.to(dev)], [w.to(dev)], [scalars.to(dev)],
                    [torch.empty(0, device=dev)], [ldz.to(dev)], [lbit.to(dev)], *cfg[1:])
                return gw, gdz, gbit

            gw_d, gdz_d, gbit_d = backward(g, w, sc_d, DEVICE)
            gw_c, gdz_c, gbit_c = backward(g, w.cpu(), sc_c, "cpu")
            assert gdz_d.shape == () and gdz_d.dtype == ldz.dtype and gbit_d.dtype == lbit.dtype
            compare_within_contract(gw_d, gw_c, w.cpu(), sc, dtype, "cuda vs cpu dL/dw")
            # Same scalars in: the sums differ only by the summation order (double).
            gw_d2, gdz_d2, gbit_d2 = backward(g, w, sc_c, DEVICE)
            assert_bitwise(gw_d2.cpu(), gw_c, "dL/dw with the same scalars")
            torch.testing.assert_close(gdz_d2.cpu(), gdz_c, rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(gbit_d2.cpu(), gbit_c, rtol=1e-5, atol=1e-12)


@pytest.mark.slow
def test_deadzone_over_2_pow_24():
    check_deadzone(make_weight((1 << 24) + 5, torch.float32, seed=24))


@pytest.mark.parametrize("n", [36_864, 2_359_296])
def test_deadzone_backward_deterministic(n):
    w = make_weight(n, torch.float32, seed=11)
    q = codeq.DeadZoneLDZCompander().to(DEVICE)
    g = torch.randn(w.shape, generator=_gen(12)).to(DEVICE)
    runs = [run_dz(q, w, g) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert_bitwise(a, b, "repeat run")


# ------------------------------------------------------------------- uniform --
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 100, 65_536, 65_537, 1 << 20])
@pytest.mark.parametrize("bitwidth", [2, 4, 8])
def test_uniform_parity(dtype, n, bitwidth):
    w = make_weight(n, dtype, seed=n)
    fused, ref = codeq.UniformSymmetric(bitwidth), codeq.UniformSymmetric(bitwidth, reference=True)
    g = torch.randn(w.shape, generator=_gen(1), dtype=torch.float64).to(dtype).to(DEVICE)
    outs = []
    for q in (fused, ref):
        x = w.clone().requires_grad_(True)
        y = q(x)
        y.backward(g)
        outs.append((y.detach(), x.grad.detach()))
    (yf, gf), (yr, gr) = outs
    a = float(w.detach().double().abs().max())
    Q = 2 ** (bitwidth - 1) - 1
    sc = {"s": a / Q, "delta": 0.0}
    compare_within_contract(yf, yr, w, sc, dtype, "uniform w_hat")
    # every element, the top level (round(w/s) == +-Q, where the gradient passes) included
    compare_within_contract(gf, gr, w, sc, dtype, "uniform dL/dw")
    yd, sd = OPS.uniform_forward(w, bitwidth)
    yc, sc_c = OPS.uniform_forward(w.cpu(), bitwidth)
    assert_bitwise(sd.cpu(), sc_c, "uniform [a, s]")
    assert_bitwise(yd.cpu(), yc, "uniform w_hat cuda vs cpu")
    assert_bitwise(OPS.uniform_backward(g, w, sd, bitwidth).cpu(), OPS.uniform_backward(g.cpu(), w.cpu(), sc_c,
                                                                                        bitwidth), "uniform grad")


@pytest.mark.parametrize("n", [10, 100_000])
def test_uniform_all_zero(n):
    w = torch.zeros(n, device=DEVICE, requires_grad=True)
    y = codeq.UniformSymmetric(4)(w)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.zeros_like(y)) and torch.equal(w.grad, torch.zeros_like(w))


# --------------------------------------------------------------- group lasso --
def _layers(specs, dtype=torch.float32, seed=0):
    g = _gen(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.05).to(dtype).to(DEVICE) for s in specs]


GL_SPECS = [(576, 192), (192, 192), (768, 192), (192, 768), (192, 3, 16, 16), (1000, 192), (7, 5), (1, 1),
            (3, 40), (33, 65)]


def _gl_ref(ws, lams):
    return reference.group_lasso_of(list(zip(ws, lams)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_lasso_parity(dtype):
    ws = _layers(GL_SPECS, dtype)
    ws[6] = torch.zeros_like(ws[6])  # all-zero columns: zero gradient
    ws[2][:, 5] = 0
    lams = [1e-4 * (i + 1) for i in range(len(ws))]
    # A layer without rows (the reference cannot take it; the ops give it no norms).
    ws_ops, lams_ops = ws + [torch.zeros(0, 4, dtype=dtype, device=DEVICE)], lams + [1e-4]
    loss_d, norms_d = OPS.group_lasso_forward(ws_ops, lams_ops)
    loss_c, norms_c = OPS.group_lasso_forward([w.cpu() for w in ws_ops], lams_ops)
    assert loss_d.dtype == loss_c.dtype and loss_d.device.type == DEVICE
    rtol = 1e-6 if dtype == torch.float32 else 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss_d.cpu(), loss_c, rtol=rtol, atol=0)
    # The column sums of squares run in another order on the two devices (a block
    # tree vs 16 lanes): a few ulps apart (a float64 norm over 576 rows was seen 2.03
    # ulps off on an H200), so 16 ulps of the norm and of the gradient w / norm.
    for nd, nc in zip(norms_d, norms_c):
        assert nd.dtype == nc.dtype and nd.shape == nc.shape
        torch.testing.assert_close(nd.cpu(), nc, rtol=16 * EPS[nd.dtype], atol=0)
    g = torch.tensor(1.5, dtype=loss_d.dtype)
    gd = OPS.group_lasso_backward(g.to(DEVICE), ws_ops, norms_d, lams_ops)
    gc = OPS.group_lasso_backward(g, [w.cpu() for w in ws_ops], norms_c, lams_ops)
    for a, b in zip(gd, gc):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, rtol=16 * EPS[a.dtype], atol=0)
    # vs the reference, through autograd
    xs = [w.clone().requires_grad_(True) for w in ws]
    xr = [w.clone().requires_grad_(True) for w in ws]
    lf = OPS.group_lasso_forward(xs, lams)[0]
    lr = _gl_ref(xr, lams)
    lf.backward()
    lr.backward()
    torch.testing.assert_close(lf.detach().double(), lr.detach().double(), rtol=1e-5, atol=0)
    for a, b in zip(xs, xr):
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=1e-5 if dtype.itemsize >= 4 else 1e-2,
                                   atol=1e-12 if dtype.itemsize >= 4 else 1e-6)


def test_group_lasso_many_layers_and_mixed_dtypes():
    specs = [(16 + i, 3 + (i % 40)) for i in range(130)]  # > 2 launches of 56 layers
    ws = _layers(specs, seed=5)
    ws = [w.double() if i % 9 == 0 else w.half() if i % 11 == 0 else w for i, w in enumerate(ws)]
    lams = [1e-3] * len(ws)
    loss_d, norms_d = OPS.group_lasso_forward(ws, lams)
    loss_c, norms_c = OPS.group_lasso_forward([w.cpu() for w in ws], lams)
    torch.testing.assert_close(loss_d.cpu(), loss_c, rtol=1e-6, atol=0)
    g = torch.tensor(0.75, dtype=loss_d.dtype)
    gd = OPS.group_lasso_backward(g.to(DEVICE), ws, norms_d, lams)
    gc = OPS.group_lasso_backward(g, [w.cpu() for w in ws], norms_c, lams)
    for a, b in zip(gd, gc):
        torch.testing.assert_close(a.cpu(), b, rtol=16 * EPS[a.dtype], atol=0)


def test_group_lasso_deterministic():
    ws = _layers(GL_SPECS[:6], seed=3)
    lams = [1e-4] * len(ws)
    r1 = OPS.group_lasso_forward(ws, lams)
    r2 = OPS.group_lasso_forward(ws, lams)
    assert_bitwise(r1[0], r2[0], "loss")
    g = torch.tensor(1.0, device=DEVICE)
    for a, b in zip(OPS.group_lasso_backward(g, ws, r1[1], lams), OPS.group_lasso_backward(g, ws, r2[1], lams)):
        assert_bitwise(a, b, "grad")


# ------------------------------------------------------------------ opcheck --
def _opcheck_cases():
    w = make_weight(3000, torch.float32).reshape(30, 100)
    big = make_weight(70_000, torch.float32)
    ldz = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    lbit = torch.tensor(1.0, device=DEVICE, requires_grad=True)
    wr = w.clone().requires_grad_(True)
    gl_cfg = ([4.0, 5.0], [2.0, 2.0], [8.0, 8.0], [True, False], [1e-3, 0.0])
    w_hat, gl, sc, nm = OPS.deadzone_forward([w, big], [ldz.detach()] * 2, [lbit.detach()] * 2, *gl_cfg)
    _, usc = OPS.uniform_forward(w, 4)
    g = torch.randn_like(w)
    ws = _layers(GL_SPECS[:4], seed=1)
    loss, norms = OPS.group_lasso_forward(ws, [1e-4] * 4)
    return [
        (OPS.abs_quantile.default, (w, 0.99)),
        (OPS.abs_quantile.default, (big, 0.99)),
        (OPS.deadzone_forward.default, ([wr], [ldz], [lbit], [4.0], [2.0], [8.0], [True], [0.0])),
        (OPS.deadzone_forward.default, ([wr, big.clone().requires_grad_(True)], [ldz] * 2, [lbit] * 2, *gl_cfg)),
        (OPS.deadzone_backward.default, ([g, torch.randn_like(big)], torch.tensor(0.5, device=DEVICE), [w, big],
                                         w_hat, sc, nm, [ldz.detach()] * 2, [lbit.detach()] * 2, *gl_cfg[1:])),
        (OPS.uniform_forward.default, (wr, 4)),
        (OPS.uniform_backward.default, (g, w, usc, 4)),
        (OPS.group_lasso_forward.default, ([x.clone().requires_grad_(True) for x in ws], [1e-4] * 4)),
        (OPS.group_lasso_backward.default, (torch.ones((), device=DEVICE), ws, norms, [1e-4] * 4)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------- torch.compile --
def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).to(DEVICE)
    codeq.attach_weight_quantizers(m, quantizer="deadzone")
    return m


def test_torch_compile_fullgraph_matches_eager():
    x = torch.randn(4, 3, 8, 8, generator=_gen(9)).to(DEVICE)

    def step(model, x):
        out = model(x)
        return out.square().mean() + codeq.group_lasso(model, 1e-3, 1e-3)

    results = []
    for compiled in (False, True):
        m = _model()
        f = torch.compile(step, fullgraph=True) if compiled else step
        loss = f(m, x)
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (le, ge), (lc, gcmp) = results
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-7)
    assert ge.keys() == gcmp.keys() and any("logit_dz" in k for k in ge)
    for k in ge:
        torch.testing.assert_close(gcmp[k], ge[k], rtol=1e-4, atol=1e-7, msg=k)


# ----------------------------------------------------- multi-layer fast path --
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_layers_equal_one_at_a_time(dtype):
    """deadzone_forward over many layers with the group lasso (the training
    step's call) gives the bits of the op called one layer at a time plus
    group_lasso_forward, forward and every gradient."""
    torch.manual_seed(5)
    shapes = [((64, 300), 1e-3), ((16, 8, 3, 3), 5e-4), ((70_000,), 0.0), ((10, 84), 2e-3)]
    ws = [(torch.randn(*s, device=DEVICE) * 0.05).to(dtype).requires_grad_() for s, _ in shapes]
    dzs = [torch.tensor(v, device=DEVICE, requires_grad=True) for v in (1.5, -2.0, 0.7, 3.0)]
    bits = [torch.tensor(v, device=DEVICE, requires_grad=True) for v in (0.4, -1.0, 2.0, 0.1)]
    fixed, lo, hi, learn = [4.0, 3.0, 6.0, 8.0], [2.0] * 4, [8.0] * 4, [True, False, True, False]
    lam = [lam_ for _, lam_ in shapes]
    w_hat, gl, _, _ = OPS.deadzone_forward(ws, dzs, bits, fixed, lo, hi, learn, lam)
    ref = [OPS.deadzone_forward([w], [d], [b], [f], [l_], [h], [lb], [0.0])[0][0]
           for w, d, b, f, l_, h, lb in zip(ws, dzs, bits, fixed, lo, hi, learn)]
    sel = [k for k, x in enumerate(lam) if x]
    ref_gl = OPS.group_lasso_forward([ref[k] for k in sel], [lam[k] for k in sel])[0]
    for a, b in zip(w_hat, ref):
        assert torch.equal(a, b)
    assert torch.equal(gl, ref_gl)
    coef = [torch.randn_like(o) for o in ref]
    params = [*ws, *dzs, *bits]
    g1 = torch.autograd.grad(sum((o.float() * c.float()).sum() for o, c in zip(w_hat, coef)) + 2 * gl, params)
    g2 = torch.autograd.grad(sum((o.float() * c.float()).sum() for o, c in zip(ref, coef)) + 2 * ref_gl, params)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
