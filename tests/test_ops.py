"""The torch.ops.codeq operators: opcheck, uniform quantizer and group lasso parity,
gradcheck, torch.compile, the public API (attach / toggle / registries)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import codeq


def _w(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ------------------------------------------------------------------ opcheck --
def dz_samples(grad):
    """Argument lists of deadzone_forward with one layer each (the quantizer
    modules' call), with and without the group lasso."""
    out = []
    for dtype in (torch.float32, torch.float64):
        for shape in ((1,), (37,), (16, 8, 3, 3)):
            w = _w(*shape, dtype=dtype, grad=grad)
            dz = torch.tensor(1.3, requires_grad=grad)
            bit = torch.tensor(-0.4, requires_grad=grad)
            lam = 0.0 if len(shape) == 1 else 0.25
            out.append(([w], [dz], [bit], [4.0], [2.0], [8.0], [True], [lam]))
            out.append(([w], [dz], [bit], [5.0], [2.0], [8.0], [False], [0.0]))
    return out


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_deadzone_forward(grad):
    for args in dz_samples(grad):
        torch.library.opcheck(torch.ops.codeq.deadzone_forward.default, args)


def test_opcheck_deadzone_backward():
    for w, dz, bit, fixed, lo, hi, lb, lam in dz_samples(False):
        w_hat, _, scalars, norms = torch.ops.codeq.deadzone_forward(w, dz, bit, fixed, lo, hi, lb, lam)
        g = [torch.randn_like(w[0])]
        torch.library.opcheck(torch.ops.codeq.deadzone_backward.default,
                              (g, torch.tensor(0.5), w, w_hat, scalars, norms, dz, bit, lo, hi, lb, lam))


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_uniform(grad):
    for dtype in (torch.float32, torch.float64):
        for bits in (2, 4, 8):
            w = _w(10, 7, dtype=dtype, grad=grad)
            torch.library.opcheck(torch.ops.codeq.uniform_forward.default, (w, bits))
            _, scale = torch.ops.codeq.uniform_forward(w.detach(), bits)
            torch.library.opcheck(torch.ops.codeq.uniform_backward.default,
                                  (torch.randn_like(w.detach()), w.detach(), scale, bits))


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_group_lasso(grad):
    ws = [_w(6, 5, grad=grad), _w(4, 3, 3, 3, grad=grad), _w(10, 2, grad=grad)]
    lams = [1e-2, 0.5, 3.0]
    torch.library.opcheck(torch.ops.codeq.group_lasso_forward.default, (ws, lams))
    _, norms = torch.ops.codeq.group_lasso_forward([w.detach() for w in ws], lams)
    torch.library.opcheck(torch.ops.codeq.group_lasso_backward.default,
                          (torch.tensor(1.5), [w.detach() for w in ws], norms, lams))


def test_opcheck_abs_quantile():
    for n in (1, 10, 20_000):
        torch.library.opcheck(torch.ops.codeq.abs_quantile.default, (torch.randn(n), 0.99))


# ------------------------------------------------------------------ uniform --
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_parity(dtype, bits, seed):
    for shape in ((1,), (5, 3), (64, 32, 3, 3)):
        w = (torch.randn(shape) * 3).to(dtype)
        g = torch.randn(shape).to(dtype)
        outs = []
        for q in (codeq.UniformSymmetric(bits), codeq.UniformSymmetric(bits, reference=True)):
            x = w.clone().requires_grad_(True)
            y = q(x)
            (dx,) = torch.autograd.grad(y, x, g)
            outs.append((y.detach(), dx))
        assert torch.equal(outs[0][0], outs[1][0]), (dtype, bits, shape, seed)
        # the sign of a zero too (torch.round(-0.3) is -0; the CUDA kernels give -0)
        assert torch.equal(torch.signbit(outs[0][0]), torch.signbit(outs[1][0])), (dtype, bits, shape, seed)
        assert torch.equal(outs[0][1], outs[1][1]), (dtype, bits, shape, seed)
        levels = torch.unique(outs[0][0].float()).numel()
        assert levels <= 2 ** bits - 1


def test_uniform_gradient_passes_at_the_clamp_bounds():
    """The spec: the clamp masks the gradient outside [-Q, Q], the bounds included --
    whatever this torch's own clamp does there (torch > 2.11 gives the bounds none).
    With s a power of two, ((g*s)/s) == g exactly."""
    w = torch.tensor([-4.0, -2.5, 1.0, 0.0, 4.0], dtype=torch.float64)  # 2 bits: Q = 1, s = 4
    g = torch.tensor([0.5, -1.5, 2.0, 3.0, -0.25], dtype=torch.float64)
    for q in (codeq.UniformSymmetric(2), codeq.UniformSymmetric(2, reference=True)):
        x = w.clone().requires_grad_(True)
        y = q(x)
        assert torch.equal(y.detach(), torch.tensor([-4.0, -4.0, 0.0, 0.0, 4.0], dtype=torch.float64)), type(q)
        (dx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(dx, g), (type(q), dx)


def test_uniform_all_zero_gives_zeros_and_zero_grad():
    """The one deliberate difference from the published code (which returns NaN)."""
    for q in (codeq.UniformSymmetric(4), codeq.UniformSymmetric(4, reference=True)):
        w = torch.zeros(8, 3, requires_grad=True)
        y = q(w)
        assert torch.count_nonzero(y) == 0 and not torch.isnan(y).any()
        (dw,) = torch.autograd.grad(y, w, torch.ones_like(y))
        assert torch.count_nonzero(dw) == 0


def test_uniform_nan_propagates():
    w = torch.randn(100)
    w[5] = float("nan")
    for q in (codeq.UniformSymmetric(4), codeq.UniformSymmetric(4, reference=True)):
        assert torch.isnan(q(w)).all()


# -------------------------------------------------------------- group lasso --
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 10)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc(x.flatten(1))))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lams", [(1e-4, 1e-4), (0.3, 0.0), (0.0, 2.0), (0.5, 0.25)])
def test_group_lasso_parity(lams, seed):
    m1 = Tiny()
    with torch.no_grad():
        m1.fc.weight[:, 3] = 0  # an all-zero column: gradient 0, not NaN
    m2 = copy.deepcopy(m1)
    l1 = codeq.group_lasso(m1, *lams)
    l2 = codeq.reference.group_lasso(m2, *lams)
    torch.testing.assert_close(l1, l2, rtol=2e-6, atol=1e-9)
    l1.backward()
    l2.backward()
    g1, g2 = _grads(m1), _grads(m2)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=2e-6, atol=1e-9, msg=k)
    assert torch.count_nonzero(m1.fc.weight.grad[:, 3]) == 0 if lams[0] else True
    assert not any(torch.isnan(g).any() for g in g1.values())


def test_group_lasso_zero_lambdas_skip_everything():
    m = Tiny()
    loss = codeq.group_lasso(m, 0.0, 0.0)
    assert float(loss) == 0.0 and not loss.requires_grad


def test_group_lasso_gradcheck_float64():
    ws = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True),
          torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)]
    lams = [0.7, 1.9]

    def g(*weights):
        return torch.ops.codeq.group_lasso_forward(list(weights), lams)[0]

    assert torch.autograd.gradcheck(g, ws, eps=1e-6, atol=1e-8)


def test_group_lasso_on_quantized_weights_flows_into_logits():
    m = Tiny()
    codeq.attach_weight_quantizers(m, ["bn"], "deadzone", {"init_deadzone_logit": 1.0})
    with parametrize.cached():
        loss = codeq.group_lasso(m, 0.5, 0.5)
    loss.backward()
    q = m.conv.parametrizations.weight[0]
    assert q.logit_dz.grad is not None and float(q.logit_dz.grad) != 0.0
    assert m.conv.parametrizations.weight.original.grad is not None


# ----------------------------------------------------------------- the API --
def test_attach_and_toggle():
    m = Tiny()
    names = codeq.attach_weight_quantizers(m, ["bn"], "deadzone", {"fixed_bit_val": 3, "learnable_bit": False})
    assert names == ["conv", "conv2", "fc", "fc2"]
    qs = list(codeq.iter_quantizers(m))
    assert len({id(q) for _, _, q in qs}) == 4  # one instance per layer
    pnames = [n for n, _ in m.named_parameters()]
    assert sum("logit_dz" in n for n in pnames) == 4 and sum("logit_bit" in n for n in pnames) == 4
    w = m.conv.parametrizations.weight.original
    assert not torch.equal(m.conv.weight, w)
    assert codeq.toggle_quantization(m, False) == 4
    assert torch.equal(m.conv.weight, w)
    codeq.toggle_quantization(m, True)
    assert torch.unique(m.fc2.weight).numel() <= 7  # 3 bits: levels -3..3


def test_attach_exclude_and_unknown():
    m = Tiny()
    names = codeq.attach_weight_quantizers(m, ["bn", "fc"], "uniform", {"bitwidth": 4})
    assert names == ["conv", "conv2"]
    with pytest.raises(KeyError, match="deadzone, uniform"):
        codeq.attach_weight_quantizers(Tiny(), [], "nope")


def test_registries():
    assert set(codeq.QUANTIZER_REGISTRY) >= {"deadzone", "uniform"}
    assert codeq.LOSS_REGISTRY["group_lasso"] is codeq.group_lasso
    assert codeq.LOSS_REGISTRY["theta_l2"] is codeq.theta_l2
    assert codeq.QUANTIZER_REGISTRY["deadzone"] is codeq.DeadZoneLDZCompander

    @codeq.register_quantizer("_test_sign")
    class Sign(nn.Module):  # a user quantizer: only forward(w) -> w_hat
        def forward(self, w):
            return torch.sign(w)

    try:
        m = Tiny()
        assert codeq.attach_weight_quantizers(m, ["bn"], "_test_sign") == ["conv", "conv2", "fc", "fc2"]
        assert torch.equal(m.fc.weight, torch.sign(m.fc.parametrizations.weight.original))
        assert codeq.toggle_quantization(m, False) == 4
        assert torch.equal(m.fc.weight, m.fc.parametrizations.weight.original)
    finally:
        del codeq.QUANTIZER_REGISTRY["_test_sign"]


def test_constructor_validation():
    with pytest.raises(ValueError, match="max_bits"):
        codeq.DeadZoneLDZCompander(max_bits=1)
    with pytest.raises(ValueError, match="bitwidth"):
        codeq.UniformSymmetric(bitwidth=40)
    one = ([4.0], [2.0], [8.0], [True], [0.0])
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.codeq.deadzone_forward([torch.empty(0)], [torch.tensor(1.0)], [torch.tensor(1.0)], *one)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.codeq.deadzone_forward([torch.randn(4)], [torch.tensor(1.0).half()], [torch.tensor(1.0)], *one)


def test_state_dict_round_trip_keeps_config():
    q = codeq.DeadZoneLDZCompander(fixed_bit_val=6, learnable_bit=False, init_deadzone_logit=0.5)
    q2 = codeq.DeadZoneLDZCompander()
    q2.load_state_dict(q.state_dict())
    assert q2._cfg == (6.0, 2.0, 8.0)
    w = torch.randn(100)
    q2.learnable_bit = False
    assert torch.equal(q(w), q2(w))


def test_info():
    info = codeq.info()
    assert info["extension_loaded"] is True
    assert "cpu" in info["fused_devices"]
    assert info["torch"] == torch.__version__


# ------------------------------------------------------------ torch.compile --
def test_compile_fullgraph_matches_eager(seed):
    torch._dynamo.reset()
    m = Tiny()
    codeq.attach_weight_quantizers(m, ["bn"], "deadzone", {"init_deadzone_logit": 1.5, "init_bit_logit": 0.6})
    m_c = copy.deepcopy(m)
    x = torch.randn(4, 3, 6, 6)
    y = torch.randint(0, 5, (4,))

    def step(model, x, y):
        with parametrize.cached():
            out = model(x)
            loss = nn.functional.cross_entropy(out, y) + codeq.group_lasso(model, 1e-2, 1e-2)
        return loss

    eager_loss = step(m, x, y)
    eager_loss.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    c_loss = compiled(m_c, x, y)
    c_loss.backward()
    torch.testing.assert_close(c_loss, eager_loss, rtol=1e-5, atol=1e-6)
    g1, g2 = _grads(m), _grads(m_c)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_compile_inductor_quantizer_only(seed):
    """The inductor backend (what `use_compile: 1` uses) traces the codeq ops with no graph break."""
    torch._dynamo.reset()
    q = codeq.DeadZoneLDZCompander(init_deadzone_logit=1.0)
    w = torch.randn(32, 16, requires_grad=True)

    def f(w):
        return (q(w) * torch.arange(16.0)).sum()

    cf = torch.compile(f, fullgraph=True)
    y1 = f(w)
    (g1,) = torch.autograd.grad(y1, w)
    y2 = cf(w)
    (g2,) = torch.autograd.grad(y2, w)
    # inductor sums the 512 products in another order: float32 rounding of a sum
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-4, msg=lambda m: f"{m} (seed={seed})")
    torch.testing.assert_close(g2, g1)


def test_missing_extension_warns_once(monkeypatch):
    from codeq import _ext

    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_LOAD_ERROR", "ImportError: test")
    monkeypatch.setattr(_ext, "_warned", False)
    monkeypatch.delenv("CODEQ_REQUIRE_EXT", raising=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        codeq.DeadZoneLDZCompander()
        codeq.DeadZoneLDZCompander()
    msgs = [str(r.message) for r in rec if "codeq._C" in str(r.message)]
    assert len(msgs) == 1 and "pip install --no-build-isolation" in msgs[0]
    monkeypatch.setenv("CODEQ_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="CODEQ_REQUIRE_EXT"):
        codeq.DeadZoneLDZCompander()


def test_source_checkout_without_build_uses_installed_extension(tmp_path):
    """`python run_training.py` in a checkout after `pip install .` imports the checkout's
    codeq/ (no compiled _C there): the installed build must be found and loaded."""
    import os
    import shutil
    import subprocess
    import sys

    src = os.path.dirname(codeq.__file__)
    dst = tmp_path / "checkout" / "codeq"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = dict(os.environ, CODEQ_REQUIRE_EXT="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(src), os.environ.get("PYTHONPATH", "")]))
    code = ("import codeq, torch; i = codeq.info(); assert i['extension_loaded'], i; "
            "assert codeq.__file__.startswith(%r); print(i['extension_path'])" % str(dst))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "checkout", env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith(src)
