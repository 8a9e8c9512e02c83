"""The multi-layer dead-zone ops (deadzone_forward_multi / deadzone_backward_multi)
and codeq.ops.DeadZoneMultiFunction: equal to the per-layer ops they replace, bit
for bit, with the group lasso fused into the CPU backward; opcheck; clear errors."""

import pytest
import torch

import codeq  # noqa: F401  (loads the ops)
from codeq.ops import DeadZoneFunction, DeadZoneMultiFunction, GroupLassoFunction

ops = torch.ops.codeq

# (shape, group-lasso lambda): Linear-like (cols % 8 == 0 and not), conv, a 1-D
# tensor (no group lasso possible), one without lambda.
LAYERS = [((24, 64), 1e-3), ((10, 84), 2e-3), ((8, 3, 3, 3), 5e-4), ((37,), 0.0), ((16, 40), 0.0), ((130, 520), 1e-3)]


def make_layers(dtype, seed_layers=LAYERS, learn=(True, False)):
    ws, dzs, bits, cfg = [], [], [], ([], [], [], [], [])
    for k, (shape, lam) in enumerate(seed_layers):
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
    """The same through the per-layer Functions (what the parametrizations run)."""
    fixed, lo, hi, learn, lam = cfg
    outs = [DeadZoneFunction.apply(w, d, b, f, l_, h, lb)[0] for w, d, b, f, l_, h, lb in
            zip(ws, dzs, bits, fixed, lo, hi, learn)]
    sel = [(o, x) for o, x in zip(outs, lam) if x != 0.0]
    gl = GroupLassoFunction.apply([x for _, x in sel], *[o for o, _ in sel])[0] if sel else None
    return outs, gl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_multi_equals_per_layer_bitwise(dtype, seed):
    ws, dzs, bits, cfg = make_layers(dtype)
    n = len(ws)
    outs = DeadZoneMultiFunction.apply(tuple(cfg), *ws, *dzs, *bits)
    w_hat, gl = outs[:n], outs[n]
    ref_hat, ref_gl = per_layer(ws, dzs, bits, cfg)
    for a, b in zip(w_hat, ref_hat):
        assert torch.equal(a, b), f"seed={seed}"
    assert torch.equal(gl, ref_gl), f"seed={seed}"

    # A loss that uses every output (and the group lasso), the same upstream gradients.
    coef = [torch.randn_like(o) for o in w_hat]

    def loss(hats, g):
        return sum((h.float() * c.float()).sum() for h, c in zip(hats, coef)) + 3.0 * g

    params = [*ws, *dzs, *bits]
    g_multi = torch.autograd.grad(loss(w_hat, gl), params)
    g_ref = torch.autograd.grad(loss(ref_hat, ref_gl), params)
    for k, (a, b) in enumerate(zip(g_multi, g_ref)):
        assert torch.equal(a, b), f"gradient {k} differs (seed={seed}): max |diff| {(a - b).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fused_cpu_backward_equals_unfused(dtype, seed):
    ws, dzs, bits, (fixed, lo, hi, learn, lam) = make_layers(dtype)
    ws = [w.detach() for w in ws]
    dzs, bits = [d.detach() for d in dzs], [b.detach() for b in bits]
    w_hat, scalars, norms, gl = ops.deadzone_forward_multi(ws, dzs, bits, fixed, lo, hi, learn, lam)
    composed = ops.deadzone_forward_multi_unfused(ws, dzs, bits, fixed, lo, hi, learn, lam)
    for part_f, part_u in zip((w_hat, scalars, norms), composed[:3]):
        for a, b in zip(part_f, part_u):
            assert torch.equal(a, b), f"seed={seed}"
    assert torch.equal(gl, composed[3]), f"seed={seed}"
    assert [tuple(x.shape) for x in norms] == [
        (w.numel() // w.shape[0],) if lam_ else (0,) for w, lam_ in zip(ws, lam)]
    grads = [torch.randn_like(w) for w in ws]
    gl_grad = torch.tensor(0.7, dtype=gl.dtype)
    args = (grads, gl_grad, ws, w_hat, scalars, norms, dzs, bits, lo, hi, learn, lam)
    fused = ops.deadzone_backward_multi(*args)
    unfused = ops.deadzone_backward_multi_unfused(*args)
    for part_f, part_u in zip(fused, unfused):
        for a, b in zip(part_f, part_u):
            assert torch.equal(a, b), f"seed={seed}"


def test_fused_backward_same_bits_for_1_and_2_threads(seed):
    ws, dzs, bits, (fixed, lo, hi, learn, lam) = make_layers(torch.float32, [((300, 1024), 1e-3), ((96, 300), 1e-3)])
    ws = [w.detach() for w in ws]
    dzs, bits = [d.detach() for d in dzs], [b.detach() for b in bits]
    w_hat, scalars, norms, gl = ops.deadzone_forward_multi(ws, dzs, bits, fixed, lo, hi, learn, lam)
    args = ([torch.randn_like(w) for w in ws], torch.tensor(1.3), ws, w_hat, scalars, norms, dzs, bits, lo, hi,
            learn, lam)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.deadzone_backward_multi(*args)
        torch.set_num_threads(2)
        two = ops.deadzone_backward_multi(*args)
    finally:
        torch.set_num_threads(old)
    for p1, p2 in zip(one, two):
        for a, b in zip(p1, p2):
            assert torch.equal(a, b)


def test_fused_cpu_large_layers_equal_unfused_for_1_and_2_threads(seed):
    """Layers big enough for the fused CPU kernels' parallel paths: the column
    sums reduced in parallel over column blocks (120 x 3072, the CIFAR MLP's
    first layer), rows grouped for the quantize pass (cols < 4096), and the
    backward's flat loop for rows that are not a multiple of 16 long, over
    two reduction chunks of which the second starts mid-row (100 x 700).  The
    same bits as the composed ops, with 1 and with 2 threads."""
    ws, dzs, bits, (fixed, lo, hi, learn, lam) = make_layers(
        torch.float32, [((120, 3072), 1e-4), ((84, 120), 1e-4), ((100, 700), 1e-3)])
    ws = [w.detach() for w in ws]
    dzs, bits = [d.detach() for d in dzs], [b.detach() for b in bits]
    grads = [torch.randn_like(w) for w in ws]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fwd = ops.deadzone_forward_multi(ws, dzs, bits, fixed, lo, hi, learn, lam)
            composed = ops.deadzone_forward_multi_unfused(ws, dzs, bits, fixed, lo, hi, learn, lam)
            for part_f, part_u in zip(fwd[:3], composed[:3]):
                for a, b in zip(part_f, part_u):
                    assert torch.equal(a, b), f"threads={threads} seed={seed}"
            assert torch.equal(fwd[3], composed[3]), f"threads={threads} seed={seed}"
            w_hat, scalars, norms, gl = fwd
            args = (grads, torch.tensor(0.9), ws, w_hat, scalars, norms, dzs, bits, lo, hi, learn, lam)
            fused = ops.deadzone_backward_multi(*args)
            unfused = ops.deadzone_backward_multi_unfused(*args)
            for part_f, part_u in zip(fused, unfused):
                for a, b in zip(part_f, part_u):
                    assert torch.equal(a, b), f"threads={threads} seed={seed}"
            results.append((fwd, fused))
    finally:
        torch.set_num_threads(old)
    (f1, b1), (f2, b2) = results
    for x, y in zip([*f1[0], *f1[2], f1[3], *b1[0], *b1[1], *b1[2]], [*f2[0], *f2[2], f2[3], *b2[0], *b2[1], *b2[2]]):
        assert torch.equal(x, y), f"seed={seed}"


def test_no_group_lasso_gives_zero_term():
    ws, dzs, bits, cfg = make_layers(torch.float32, [((6, 8), 0.0), ((5,), 0.0)])
    outs = DeadZoneMultiFunction.apply(tuple(cfg), *ws, *dzs, *bits)
    assert outs[2].item() == 0.0 and outs[2].dtype == torch.float32
    outs[0].sum().backward()  # outs[1] unused: its gradient is taken as zero
    assert ws[0].grad is not None and ws[1].grad is not None and torch.count_nonzero(ws[1].grad) == 0


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_multi(grad):
    ws, dzs, bits, (fixed, lo, hi, learn, lam) = make_layers(torch.float32, LAYERS[:4])
    ws = [w.detach().requires_grad_(grad) for w in ws]
    dzs = [d.detach().requires_grad_(grad) for d in dzs]
    bits = [b.detach().requires_grad_(grad) for b in bits]
    # autograd is DeadZoneMultiFunction's, not the op's: test the op's schema / fake kernel only
    for name in ("deadzone_forward_multi", "deadzone_forward_multi_unfused"):
        torch.library.opcheck(getattr(ops, name).default, (ws, dzs, bits, fixed, lo, hi, learn, lam),
                              test_utils=("test_schema", "test_faketensor"))
    with torch.no_grad():
        w_hat, scalars, norms, gl = ops.deadzone_forward_multi(ws, dzs, bits, fixed, lo, hi, learn, lam)
    args = ([torch.randn_like(w) for w in w_hat], torch.tensor(0.5), [w.detach() for w in ws], w_hat, scalars, norms,
            [d.detach() for d in dzs], [b.detach() for b in bits], lo, hi, learn, lam)
    for name in ("deadzone_backward_multi", "deadzone_backward_multi_unfused"):
        torch.library.opcheck(getattr(ops, name).default, args, test_utils=("test_schema", "test_faketensor"))


def test_multi_bad_inputs_are_clear_errors():
    w = torch.randn(4, 6)
    d, b = torch.tensor(1.0), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="one entry per weight"):
        ops.deadzone_forward_multi([w, w], [d], [b, b], [4.0, 4.0], [2.0, 2.0], [8.0, 8.0], [True, True], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="got no weights|no tensor arguments"):
        ops.deadzone_forward_multi([], [], [], [], [], [], [], [])
    with pytest.raises(RuntimeError, match="fewer than 2 dims"):
        ops.deadzone_forward_multi([torch.randn(5)], [d], [b], [4.0], [2.0], [8.0], [True], [1e-3])
    with pytest.raises(RuntimeError, match="must be finite and >= 0"):
        ops.deadzone_forward_multi([w], [d], [b], [4.0], [2.0], [8.0], [True], [-1.0])


def test_backward_twice_with_retain_graph(seed):
    ws, dzs, bits, cfg = make_layers(torch.float32, LAYERS[:3])
    outs = DeadZoneMultiFunction.apply(tuple(cfg), *ws, *dzs, *bits)
    loss = sum(o.square().sum() for o in outs[:3]) + outs[3]
    g1 = torch.autograd.grad(loss, ws, retain_graph=True)
    g2 = torch.autograd.grad(loss, ws)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_double_backward_is_a_clear_error(seed):
    """The C++ autograd node has no double backward: create_graph=True says so
    (rather than silently returning gradients without a graph)."""
    ws, dzs, bits, cfg = make_layers(torch.float32, LAYERS[:2])
    outs = DeadZoneMultiFunction.apply(tuple(cfg), *ws, *dzs, *bits)
    loss = outs[0].square().sum() + outs[1].sum() + outs[2]
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, ws, create_graph=True)


def test_multi_op_is_differentiable_directly(seed):
    """torch.ops.codeq.deadzone_multi (what the training fast path calls) gives
    the per-layer gradients; scalars and norms carry no gradient."""
    ws, dzs, bits, cfg = make_layers(torch.float32, LAYERS)
    w_hat, gl, scalars, norms = ops.deadzone_multi(ws, dzs, bits, *cfg)
    assert gl.requires_grad and all(h.requires_grad for h in w_hat)
    assert not any(t.requires_grad for t in (*scalars, *norms))
    ref_hat, ref_gl = per_layer(ws, dzs, bits, cfg)
    params = [*ws, *dzs, *bits]
    g = torch.autograd.grad(w_hat[0].sum() + 2.0 * gl, params, allow_unused=True)
    r = torch.autograd.grad(ref_hat[0].sum() + 2.0 * ref_gl, params, allow_unused=True)
    for k, (a, b) in enumerate(zip(g, r)):
        a = torch.zeros_like(params[k]) if a is None else a
        b = torch.zeros_like(params[k]) if b is None else b
        assert torch.equal(a, b), f"gradient {k} differs (seed={seed})"
