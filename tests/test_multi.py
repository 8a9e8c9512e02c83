"""codeq::deadzone_forward over many layers, with the group lasso of the quantized
weights fused in: bit for bit the op called one layer at a time plus
group_lasso_forward (forward and every gradient), for any number of threads;
opcheck; clear errors."""

import pytest
import torch

import codeq  # noqa: F401  (loads the ops)

ops = torch.ops.codeq

# (shape, group-lasso lambda): Linear-like (cols % 16 == 0 and not), conv, a 1-D
# tensor (no group lasso possible), one without lambda, rows that span reduction
# chunks, rows shorter than a vector of 16 (and of one element).
LAYERS = [((24, 64), 1e-3), ((10, 84), 2e-3), ((8, 3, 3, 3), 5e-4), ((37,), 0.0), ((16, 40), 0.0), ((130, 520), 1e-3),
          ((40, 5), 1e-3), ((33, 1), 2e-3)]


def make_layers(dtype, layers=LAYERS, learn=(True, False)):
    ws, dzs, bits, cfg = [], [], [], ([], [], [], [], [])
    for k, (shape, lam) in enumerate(layers):
        ws.append((torch.randn(*shape) * 0.05).to(dtype).requires_grad_())
        dzs.append(torch.tensor(float(torch.empty(()).uniform_(-4, 4)), requires_grad=True))
        bits.append(torch.tensor(float(torch.empty(()).uniform_(-3, 3)), requires_grad=True))
        cfg[0].append(float(2 + k % 6))
        cfg[1].append(2.0)
        cfg[2].append(8.0)
        cfg[3].append(learn[k % len(learn)])
        cfg[4].append(lam)
    return ws, dzs, bits, cfg


def per_layer(ws, dzs, bits, cfg):
    """The same, one layer per call of the op (no group lasso), then
    group_lasso_forward over the quantized weights that have a lambda."""
    fixed, lo, hi, learn, lam = cfg
    outs = [ops.deadzone_forward([w], [d], [b], [f], [l_], [h], [lb], [0.0])[0][0]
            for w, d, b, f, l_, h, lb in zip(ws, dzs, bits, fixed, lo, hi, learn)]
    sel = [(o, x) for o, x in zip(outs, lam) if x != 0.0]
    gl = ops.group_lasso_forward([o for o, _ in sel], [x for _, x in sel])[0] if sel else None
    return outs, gl


def backward_unfused(grads, gl_grad, ws, w_hat, scalars, norms, dzs, bits, lo, hi, learn, lam):
    """deadzone_backward composed: the group lasso's gradient added to the
    incoming one (as autograd adds them), then the backward without it."""
    g = list(grads)
    sel = [k for k, x in enumerate(lam) if x != 0.0]
    if sel:
        gl_g = ops.group_lasso_backward(gl_grad, [w_hat[k] for k in sel], [norms[k] for k in sel],
                                        [lam[k] for k in sel])
        for k, t in zip(sel, gl_g):
            g[k] = g[k] + t
    return ops.deadzone_backward(g, gl_grad, ws, w_hat, scalars, norms, dzs, bits, lo, hi, learn, [0.0] * len(ws))


def assert_all_equal(xs, ys, msg):
    xs, ys = list(xs), list(ys)
    assert len(xs) == len(ys), msg
    for k, (a, b) in enumerate(zip(xs, ys)):
        if isinstance(a, (list, tuple)):
            assert_all_equal(a, b, f"{msg} [{k}]")
        else:
            assert torch.equal(a, b), f"{msg} [{k}]: max |diff| {(a.double() - b.double()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_many_layers_equal_one_at_a_time_bitwise(dtype, seed):
    ws, dzs, bits, cfg = make_layers(dtype)
    w_hat, gl, scalars, norms = ops.deadzone_forward(ws, dzs, bits, *cfg)
    assert gl.requires_grad and all(h.requires_grad for h in w_hat)
    assert not any(t.requires_grad for t in (*scalars, *norms))
    assert [tuple(x.shape) for x in norms] == [
        (w.numel() // w.shape[0],) if lam else (0,) for w, lam in zip(ws, cfg[4])]
    ref_hat, ref_gl = per_layer(ws, dzs, bits, cfg)
    assert_all_equal(w_hat, ref_hat, f"w_hat seed={seed}")
    assert torch.equal(gl, ref_gl), f"seed={seed}"

    # A loss that uses every output (and the group lasso), the same upstream gradients.
    coef = [torch.randn_like(o) for o in w_hat]

    def loss(hats, g):
        return sum((h.float() * c.float()).sum() for h, c in zip(hats, coef)) + 3.0 * g

    params = [*ws, *dzs, *bits]
    g_multi = torch.autograd.grad(loss(w_hat, gl), params)
    g_ref = torch.autograd.grad(loss(ref_hat, ref_gl), params)
    assert_all_equal(g_multi, g_ref, f"gradients seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fused_backward_equals_composed(dtype, seed):
    ws, dzs, bits, (fixed, lo, hi, learn, lam) = make_layers(dtype)
    ws = [w.detach() for w in ws]
    dzs, bits = [d.detach() for d in dzs], [b.detach() for b in bits]
    w_hat, gl, scalars, norms = ops.deadzone_forward(ws, dzs, bits, fixed, lo, hi, learn, lam)
    args = ([torch.randn_like(w) for w in ws], torch.tensor(0.7, dtype=gl.dtype), ws, w_hat, scalars, norms, dzs,
            bits, lo, hi, learn, lam)
    assert_all_equal(ops.deadzone_backward(*args), backward_unfused(*args), f"seed={seed}")


def test_large_layers_same_bits_for_1_and_2_threads(seed):
    """Layers big enough for the CPU kernels' parallel paths: the column sums
    reduced in parallel over column blocks (120 x 3072, the CIFAR MLP's first
    layer), and backward chunks that start mid-row in rows that are not a
    multiple of 16 long (100 x 700).  The composed result's bits, with 1 and
    with 2 threads."""
    ws, dzs, bits, (fixed, lo, hi, learn, lam) = make_layers(
        torch.float32, [((120, 3072), 1e-4), ((84, 120), 1e-4), ((100, 700), 1e-3), ((300, 1024), 1e-3)])
    ws = [w.detach() for w in ws]
    dzs, bits = [d.detach() for d in dzs], [b.detach() for b in bits]
    grads = [torch.randn_like(w) for w in ws]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fwd = ops.deadzone_forward(ws, dzs, bits, fixed, lo, hi, learn, lam)
            ref_hat, ref_gl = per_layer(ws, dzs, bits, (fixed, lo, hi, learn, lam))
            assert_all_equal(fwd[0], ref_hat, f"threads={threads} seed={seed}")
            assert torch.equal(fwd[1], ref_gl), f"threads={threads} seed={seed}"
            w_hat, gl, scalars, norms = fwd
            args = (grads, torch.tensor(0.9), ws, w_hat, scalars, norms, dzs, bits, lo, hi, learn, lam)
            bwd = ops.deadzone_backward(*args)
            assert_all_equal(bwd, backward_unfused(*args), f"threads={threads} seed={seed}")
            results.append((fwd, bwd))
    finally:
        torch.set_num_threads(old)
    assert_all_equal(results[0], results[1], f"1 vs 2 threads, seed={seed}")


def test_no_group_lasso_gives_zero_term():
    ws, dzs, bits, cfg = make_layers(torch.float32, [((6, 8), 0.0), ((5,), 0.0)])
    w_hat, gl, _, _ = ops.deadzone_forward(ws, dzs, bits, *cfg)
    assert gl.item() == 0.0 and gl.dtype == torch.float32
    w_hat[0].sum().backward()  # w_hat[1] unused: its gradient is taken as zero
    assert ws[0].grad is not None and ws[1].grad is not None and torch.count_nonzero(ws[1].grad) == 0


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck(grad):
    ws, dzs, bits, (fixed, lo, hi, learn, lam) = make_layers(torch.float32, LAYERS[:4])
    ws = [w.detach().requires_grad_(grad) for w in ws]
    dzs = [d.detach().requires_grad_(grad) for d in dzs]
    bits = [b.detach().requires_grad_(grad) for b in bits]
    torch.library.opcheck(ops.deadzone_forward.default, (ws, dzs, bits, fixed, lo, hi, learn, lam))
    with torch.no_grad():
        w_hat, gl, scalars, norms = ops.deadzone_forward(ws, dzs, bits, fixed, lo, hi, learn, lam)
    args = ([torch.randn_like(w) for w in w_hat], torch.tensor(0.5), [w.detach() for w in ws], w_hat, scalars, norms,
            [d.detach() for d in dzs], [b.detach() for b in bits], lo, hi, learn, lam)
    torch.library.opcheck(ops.deadzone_backward.default, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_are_clear_errors():
    w = torch.randn(4, 6)
    d, b = torch.tensor(1.0), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="one entry per weight"):
        ops.deadzone_forward([w, w], [d], [b, b], [4.0, 4.0], [2.0, 2.0], [8.0, 8.0], [True, True], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="one entry per weight"):
        ops.deadzone_forward([w, w], [d, d], [b, b], [4.0], [2.0, 2.0], [8.0, 8.0], [True, True], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="got no weights|no tensor arguments"):
        ops.deadzone_forward([], [], [], [], [], [], [], [])
    with pytest.raises(RuntimeError, match="fewer than 2 dims"):
        ops.deadzone_forward([torch.randn(5)], [d], [b], [4.0], [2.0], [8.0], [True], [1e-3])
    with pytest.raises(RuntimeError, match="must be finite and >= 0"):
        ops.deadzone_forward([w], [d], [b], [4.0], [2.0], [8.0], [True], [-1.0])
    with pytest.raises(RuntimeError, match="the weight tensor is empty"):
        ops.deadzone_forward([torch.empty(0, 3)], [d], [b], [4.0], [2.0], [8.0], [True], [0.0])


def test_backward_twice_with_retain_graph(seed):
    ws, dzs, bits, cfg = make_layers(torch.float32, LAYERS[:3])
    w_hat, gl, _, _ = ops.deadzone_forward(ws, dzs, bits, *cfg)
    loss = sum(o.square().sum() for o in w_hat) + gl
    g1 = torch.autograd.grad(loss, ws, retain_graph=True)
    g2 = torch.autograd.grad(loss, ws)
    assert_all_equal(g1, g2, f"seed={seed}")


def test_double_backward_is_a_clear_error(seed):
    """The C++ autograd has no double backward: create_graph=True says so
    (rather than silently returning gradients without a graph)."""
    ws, dzs, bits, cfg = make_layers(torch.float32, LAYERS[:2])
    w_hat, gl, _, _ = ops.deadzone_forward(ws, dzs, bits, *cfg)
    loss = w_hat[0].square().sum() + w_hat[1].sum() + gl
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, ws, create_graph=True)
