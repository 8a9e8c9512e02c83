"""Fused CPU kernels vs the pure-PyTorch reference over the spec's parity matrix."""

import math

import pytest
import torch

import codeq
from codeq import reference as R
from parity import Report, check_case, make_pair, run

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
THETA_DZ = [-6.0, -2.5, -0.7, -0.05, 0.0, 0.3, 1.0, 3.0, 6.0]


def theta_for_bits(B, sign=1.0):
    """θ_bit whose learnable bit-width is B (max 8, min 2)."""
    t = (B - 2) / 6
    return sign * (6.0 if t >= 1 else math.atanh(t))


def random_weight(shape, dtype, kind):
    if kind == "normal":
        w = torch.randn(shape)
    elif kind == "heavy":
        w = torch.randn(shape) ** 3
    elif kind == "small":
        w = torch.randn(shape) * 1e-3
    else:  # uniform-ish with ties: a coarse grid makes many equal |w|
        w = torch.randint(-20, 21, shape).float() / 7
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("learnable_bit", [True, False], ids=["lbit", "fixbit"])
@pytest.mark.parametrize("learnable_deadzone", [True, False], ids=["ldz", "frozendz"])
def test_parity_matrix(dtype, learnable_bit, learnable_deadzone, seed):
    rep = Report()
    shapes = [(1,), (2,), (7,), (3, 5), (16, 3, 3, 3), (64, 64, 3, 3), (120, 3072)]
    kinds = ["normal", "heavy", "small", "ties"]
    case = 0
    for B in range(2, 9):
        for j, th_dz in enumerate(THETA_DZ):
            shape = shapes[(B + j) % len(shapes)]
            kind = kinds[(B * 3 + j) % len(kinds)]
            w = random_weight(shape, dtype, kind)
            g = torch.randn(shape).to(dtype)
            sign = -1.0 if (B + j) % 2 else 1.0
            th_bit = theta_for_bits(B, sign) if learnable_bit else 3.0
            check_case(w, g, learnable_bit, learnable_deadzone, th_dz, th_bit, fixed_bit_val=B, rep=rep,
                       ctx=f"seed={seed} kind={kind}")
            case += 1
    assert case == 63
    # Boundary flips are allowed by the contract but must be rare (< 1e-4).
    assert rep.flips <= max(1, rep.elements * 1e-4), f"{rep.flips} flips in {rep.elements} elements (seed={seed})"


def test_bit_width_covers_2_to_8():
    for B in range(2, 9):
        for sign in (1.0, -1.0):
            q = codeq.DeadZoneLDZCompander(init_bit_logit=theta_for_bits(B, sign))
            assert int(q.get_bitwidth()) == B
        q = codeq.DeadZoneLDZCompander(fixed_bit_val=B, learnable_bit=False)
        assert int(q.get_bitwidth()) == B


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_contiguous(dtype, seed):
    base = torch.randn(96, 80, dtype=dtype)
    for w in (base.t(), base[:, ::3], base[::2].transpose(0, 1)[5:]):
        assert not w.is_contiguous()
        g = torch.randn(w.shape, dtype=dtype).t().contiguous().t()  # non-contiguous gradient too
        check_case(w, g, True, True, 1.5, 2.0, ctx=f"seed={seed} non-contiguous")


def test_all_zero(seed):
    for dtype in DTYPES:
        w = torch.zeros(33, 17, dtype=dtype)
        g = torch.randn(33, 17).to(dtype)
        fused, ref = make_pair()
        for q in (fused, ref):
            out, dw, gdz, gbit = run(q, w, g)
            assert torch.count_nonzero(out) == 0
            assert torch.count_nonzero(dw) == 0
            assert float(gdz) == 0.0 and float(gbit) == 0.0
        check_case(w, g, True, True, 3.0, 3.0, ctx="all-zero")


def test_nan_makes_everything_nan():
    """Defined behaviour: a NaN anywhere makes the 0.99-quantile NaN (as torch.quantile)
    and the whole quantized tensor NaN, in both implementations."""
    for n in (10, 100_000):
        w = torch.randn(n)
        w[n // 3] = float("nan")
        fused, ref = make_pair()
        for q in (fused, ref):
            out = q(w)
            assert torch.isnan(out).all()
        assert torch.isnan(torch.ops.codeq.abs_quantile(w, 0.99))
        assert torch.isnan(torch.quantile(w.abs(), 0.99))


def test_inf_saturates():
    """±Inf elements saturate to the outermost level while the quantile stays finite;
    with over 1% Inf the quantile is Inf and everything is NaN, in both implementations."""
    w = torch.randn(50)
    w[3], w[7] = float("inf"), -float("inf")
    fused, ref = make_pair()
    assert torch.isnan(fused(w)).all() and torch.isnan(ref(w)).all()
    # s is Inf: the reference's ((g·s)/s) is NaN, and so is the kernels' dL/dw (no division there)
    g = torch.randn(50)
    assert torch.isnan(run(fused, w, g)[1]).all() and torch.isnan(run(ref, w, g)[1]).all()
    for n in (500, 50_000):
        w = torch.randn(n)
        w[3], w[7] = float("inf"), -float("inf")
        g = torch.randn(n)
        fused, ref = make_pair(theta_dz=2.0, theta_bit=1.0)
        f_out, f_dw, f_dz, f_bit = run(fused, w, g)
        r_out, r_dw, r_dz, r_bit = run(ref, w, g)
        assert torch.equal(f_out, r_out)
        assert torch.isfinite(f_out).all()
        sc = ref.get_scalars(w)
        top = sc["s"] * sc["Q"] + sc["delta"]
        assert f_out[3] == top and f_out[7] == -top
        assert torch.equal(f_dw, g * torch.sign(w) ** 2)  # the spec's exact value
        torch.testing.assert_close(f_dw, r_dw, rtol=1e-6, atol=0)  # the reference's ((g·s)/s)·sign²
        # G_s contains g*(Q - inf): the logit gradients are not finite in either implementation
        assert not torch.isfinite(f_dz) and not torch.isfinite(r_dz)


def test_quantile_matches_torch_quantile(seed):
    """The reference's quantile is torch.quantile's (same rank and weight; torch's lerp may
    use an FMA, so allow one ulp; torch <= 2.11 computes the rank 0.99*(n-1) in the input
    dtype, which moves the weight by up to an ulp of the rank: allow that too), and the
    fused one is the reference's bit for bit."""
    for n in (1, 2, 3, 100, 101, 1000, 36_864, 147_456, 1_000_003):
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(n, dtype=dtype)
            if n > 10:
                x[: n // 10] = x[n // 10 : 2 * (n // 10)]  # ties
            expect = torch.quantile(x.abs(), 0.99)
            ref = R.abs_quantile(x)
            eps = torch.finfo(dtype).eps
            v = x.abs().sort().values
            lo = int(0.99 * (n - 1))
            gap = float(v[min(lo + 1, n - 1)] - v[lo])
            tol = eps * float(expect) + eps * 0.99 * (n - 1) * gap
            assert abs(float(ref) - float(expect)) <= tol, (n, dtype, seed, float(ref), float(expect))
            assert torch.equal(torch.ops.codeq.abs_quantile(x, 0.99), ref), (n, dtype, seed)


def test_quantile_other_q_and_threads(seed):
    x = torch.randn(300_001)
    old = torch.get_num_threads()
    try:
        for q in (0.0, 0.25, 0.5, 0.99, 1.0):
            expect = R.abs_quantile(x, q)
            assert abs(float(expect) - float(torch.quantile(x.abs(), q))) <= 1.2e-7 * float(expect)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert torch.equal(torch.ops.codeq.abs_quantile(x, q), expect), (q, threads, seed)
    finally:
        torch.set_num_threads(old)


def test_reference_gradients_follow_the_spec_chain(seed):
    """The reference's autograd gradients equal the spec's closed form (float64)."""
    for lb in (True, False):
        w = torch.randn(40, 30, dtype=torch.float64)
        g = torch.randn(40, 30, dtype=torch.float64)
        ref = codeq.DeadZoneLDZCompander(init_deadzone_logit=0.8, init_bit_logit=-0.9, learnable_bit=lb,
                                         reference=True).double()
        out, dw, gdz, gbit = run(ref, w, g)
        sc = ref.get_scalars(w)
        a, d, Q, B, s, delta = (float(sc[k]) for k in ("a", "d", "Q", "B", "s", "delta"))
        u = torch.sign(w) * torch.relu(w.abs() - delta)
        q = torch.clamp(torch.round(u / s), -Q, Q)
        G_s = float((g * (q - u / s)).sum())
        G_d = float((g * (torch.sign(q) - torch.sign(w))).sum())
        dLds = G_s - G_d / 2
        dLdd = G_d / 2 - dLds / (2 * (Q - 0.5))
        dLdQ = -dLds * (a - d / 2) / (Q - 0.5) ** 2
        t = math.tanh(float(ref.logit_dz.detach()))
        assert gdz.item() == pytest.approx(dLdd * (-2 * a * math.copysign(1, t) * (1 - t * t)), rel=1e-9, abs=1e-12)
        if lb:
            tb = math.tanh(float(ref.logit_bit.detach()))
            expect = dLdQ * 2 ** (B - 1) * math.log(2) * 6 * math.copysign(1, tb) * (1 - tb * tb)
            assert gbit.item() == pytest.approx(expect, rel=1e-9, abs=1e-12)
        torch.testing.assert_close(dw, g * torch.sign(w) ** 2, rtol=1e-14, atol=0)  # ((g·s)/s)·sign²
        assert torch.equal(out, s * q + delta * torch.sign(q))


def test_backward_is_deterministic_across_threads(seed):
    w = torch.randn(2_000_000)
    g = torch.randn(2_000_000)
    q = codeq.DeadZoneLDZCompander(init_deadzone_logit=1.2)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            results.append(run(q, w, g))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        for x, y in zip(results[0], r):
            assert torch.equal(x, y)


def test_forward_matches_reference_bitwise_on_cpu(seed):
    """Stronger than the contract: on the CPU the fused forward rounds exactly like the
    reference.  ∂L/∂w is the spec's exact g·sign(w)², where the reference's autograd
    graph computes ((g·s)/s)·sign(w)²: the two differ by at most an ulp, in a minority of
    the elements (the contract allows rtol 1e-6)."""
    w = torch.randn(64, 64, 3, 3)
    w[0, 0, 0, :] = 0.0
    g = torch.randn_like(w)
    fused, ref = make_pair(theta_dz=0.9, theta_bit=0.4)
    f = run(fused, w, g)
    r = run(ref, w, g)
    assert torch.equal(f[0], r[0])
    assert torch.equal(f[1], g * torch.sign(w) ** 2)
    torch.testing.assert_close(f[1], r[1], rtol=2.0 ** -23, atol=0)
    differ = int((f[1] != r[1]).sum())
    assert differ < w.numel() // 2, differ


@pytest.mark.parametrize("kind", ["plain", "inf", "nan"])
def test_forward_bits_match_reference_on_special_values(kind, seed):
    """On the CPU, w_hat has the reference's bits, the sign of every zero included, and
    NaN in the same places, over the settings matrix, for weights holding +-0,
    subnormals, huge values and (per kind) +-Inf or a NaN: the kernels' selects and
    min/max forms of sign, relu and clamp must be exactly torch's."""
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1e-30, -1e-30, 3.0, -3.0, 1e30, -1e30])
    for theta_dz in (-6.0, -0.3, 0.0, 0.05, 0.9, 3.0, 6.0):
        for learnable_bit, fixed_bit, theta_bit in ((True, 4, -3.0), (True, 4, 0.4), (True, 4, 3.0),
                                                    (False, 2, 0.0), (False, 3, 0.0), (False, 8, 0.0)):
            w = torch.randn(4096) * 0.05
            w[: len(special)] = special
            if kind == "inf":
                w[100], w[200] = math.inf, -math.inf
            elif kind == "nan":
                w[300] = math.nan
            g = torch.randn_like(w)
            fused, ref = make_pair(learnable_bit=learnable_bit, fixed_bit_val=fixed_bit, theta_dz=theta_dz,
                                   theta_bit=theta_bit)
            f, r = run(fused, w, g)[0], run(ref, w, g)[0]
            ctx = f"(θdz={theta_dz}, lb={learnable_bit}, bits={fixed_bit}, θbit={theta_bit}, {kind}, seed={seed})"
            fn, rn = torch.isnan(f), torch.isnan(r)
            assert torch.equal(fn, rn), f"NaN positions differ {ctx}"
            diff = f[~fn].view(torch.int32) != r[~rn].view(torch.int32)
            assert not diff.any(), f"{int(diff.sum())} elements differ in bits {ctx}: " \
                                   f"{f[~fn][diff][:4].tolist()} vs {r[~rn][diff][:4].tolist()}"


@pytest.mark.slow
def test_parity_over_2_pow_24(seed):
    n = (1 << 24) + 12_345
    w = torch.randn(n)
    g = torch.randn(n)
    check_case(w, g, True, True, 2.0, 0.7, ctx=f"seed={seed} n>2^24")


@pytest.mark.parametrize("kind", ["normal", "uniform", "ties", "heavy", "mostly_zero", "sorted"])
def test_quantile_paths_on_structured_data(kind, seed):
    """The CPU quantile's radix select (a first call) and its window around the previous
    answer (a second call on the same storage) give the reference's quantile bit for bit
    on large tensors of every shape of distribution."""
    for n in (65_536, 100_003, 368_640):
        if kind == "normal":
            x = torch.randn(n)
        elif kind == "uniform":
            x = torch.rand(n) * 2 - 1
        elif kind == "ties":
            x = torch.randint(-3, 4, (n,)).float()
        elif kind == "heavy":
            x = torch.randn(n) ** 5
        elif kind == "mostly_zero":
            x = torch.zeros(n)
            x[: n // 200] = torch.randn(n // 200)
        else:  # sorted: a strided sample sees a very structured tensor
            x = torch.sort(torch.randn(n)).values
        for q in (0.5, 0.9, 0.99, 0.999):
            for call in range(2):
                got = torch.ops.codeq.abs_quantile(x, q)
                assert torch.equal(got, R.abs_quantile(x, q)), (kind, n, q, call, seed)
        for dt in (torch.float64, torch.bfloat16):
            y = x.to(dt)
            for call in range(2):
                got = torch.ops.codeq.abs_quantile(y, 0.99)
                assert torch.equal(got, R.abs_quantile(y, 0.99)), (kind, n, dt, call, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_quantile_hint_is_exact(dtype, seed):
    """The CPU quantile starts from its previous answer for the same storage (a
    window around it; csrc/cpu/quantile_cpu.h): a training step's in-place
    updates, big jumps, ties, NaN and an all-zero tensor all still give
    torch.quantile's answer bit for bit, and the hint is really used."""
    from codeq import _ext

    g = torch.Generator().manual_seed(seed)
    hits0, misses0 = _ext._C.quantile_hint_stats()
    for n in (8192, 50_000, 368_640):
        w = (torch.rand(n, generator=g) - 0.5).to(dtype)
        for step in range(14):
            if step == 5:
                w.mul_(3.0)  # a jump far outside the window: a miss, then hits again
            elif step == 8:
                w.copy_(torch.randint(-20, 21, (n,), generator=g).to(dtype) / 7)  # heavy ties
            elif step == 10:
                w[n // 2] = float("nan")
            elif step == 11:
                w.copy_((torch.randn(n, generator=g) * 0.05).to(dtype))
            elif step == 12:
                w.zero_()
            else:
                w.add_((torch.randn(n, generator=g) * 0.002).to(dtype))  # an optimizer step's drift
            got = torch.ops.codeq.abs_quantile(w, 0.99)
            want = R.abs_quantile(w, 0.99)
            assert torch.equal(got, want) or (got.isnan() and want.isnan()), (dtype, n, step, float(got), float(want))
    hits, misses = _ext._C.quantile_hint_stats()
    assert hits - hits0 >= 3 * 6, (hits - hits0, misses - misses0)  # the drift steps hit
    assert misses - misses0 >= 3, (hits - hits0, misses - misses0)  # the first call and the jumps miss
