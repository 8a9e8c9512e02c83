"""The trainer's fast path (fused kernels, each quantizer run once per step under
parametrize.cached(), all layers' group lasso in one fused call) computes the same
loss and gradients as the straightforward one (pure-PyTorch reference quantizers,
reference group lasso, every weight access re-quantizing)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import codeq
from codeq import reference as R
from codeq.losses import group_lasso_layers
from codeq.train.optim import build_optimizer
from codeq.train.config import config_from_dict
from codeq.train.trainer import Trainer
from codeq.train.trainer import build_run_model as build_model

MODELS = {
    "mlp": ({"hidden": [24, 16]}, [], 32, (1e-3, 1e-3)),
    "resnet20": ({"num_blocks": [1, 1, 1], "width": 4}, ["bn"], 32, (1e-3, 1e-3)),
    "vit": ({"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}, ["norm"], 32, (1e-3, 0.0)),
}


def config(model, reference=False, loss="group_lasso", learnable_bit=True):
    kw, exclude, img, (ll, lc) = MODELS[model]
    qkw = {"init_deadzone_logit": 1.2, "init_bit_logit": 0.5, "learnable_bit": learnable_bit, "reference": reference}
    return config_from_dict({
        "model": model, "model_kwargs": kw, "img_size": img, "epochs": 1, "batch_size": 8, "device": "cpu",
        "workers": 0, "seed": 0, "save_dir": "/tmp/unused",
        "dataset": {"name": "synthetic", "train_size": 8, "val_size": 8},
        "quantizer": {"name": "deadzone", "exclude_layers": exclude, "kwargs": qkw},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 1e-3}, "dz": {"lr": 1e-2}, "bit": {"lr": 1e-3}}},
        "loss_terms": [{"name": loss, "lambda": 0.7, "kwargs": {"lambda_linear": ll, "lambda_conv": lc}}],
    })


@pytest.fixture(autouse=True)
def _reference_entries():
    codeq.LOSS_REGISTRY["_ref_group_lasso"] = R.group_lasso
    yield
    del codeq.LOSS_REGISTRY["_ref_group_lasso"]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("learnable_bit", [True, False], ids=["lbit", "fixbit"])
def test_fast_step_equals_straightforward(model, learnable_bit, seed):
    fast_cfg = config(model, learnable_bit=learnable_bit)
    slow_cfg = config(model, True, "_ref_group_lasso", learnable_bit)
    torch.manual_seed(seed)
    fast = build_model(fast_cfg)
    slow = build_model(slow_cfg)
    slow.load_state_dict(fast.state_dict())
    fast.train(), slow.train()
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))

    trainer = Trainer(fast_cfg, torch.device("cpu"), fast, build_optimizer(fast_cfg, fast), None, None, None,
                      torch.Generator())
    loss_fast, parts, _ = trainer.compute_loss(x, y)
    ce_fast = parts["ce"]
    loss_fast.backward()

    # straightforward: no caching (the group lasso re-runs every quantizer), reference math throughout
    kw = slow_cfg.loss_terms[0].kwargs
    ce_slow = F.cross_entropy(slow(x), y)
    loss_slow = ce_slow + 0.7 * R.group_lasso(slow, **kw)
    loss_slow.backward()

    torch.testing.assert_close(ce_fast, ce_slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-5, atol=1e-6)
    gf, gs = grads(fast), grads(slow)
    assert gf.keys() == gs.keys() and len(gf) > 0
    logit_ref = logit_grads_float64(slow_cfg, fast.state_dict(), x, y, 0.7)
    for k in gf:
        if "logit_" in k:
            # The logits' gradients are sums that cancel (G_s, G_δ): held to the parity
            # contract against the float64 reference, as in test_parity.py.
            g64, tol = logit_ref[k]
            err = abs(float(gf[k]) - g64)
            own = abs(float(gs[k]) - g64)
            assert err <= max(tol, 4 * own) + 1e-30, \
                f"{k}: fast {float(gf[k])!r} vs float64 reference {g64!r} (err {err:.3g}, contract tol {tol:.3g}, " \
                f"float32 reference err {own:.3g}; seed={seed})"
            continue
        scale = gs[k].abs().max().clamp_min(1e-12)
        err = (gf[k] - gs[k]).abs().max() / scale
        assert err < 1e-4, f"{k}: relative error {float(err):.3g} (seed={seed})"
    assert any("logit_dz" in k for k in gf)


def logit_grads_float64(cfg, state, x, y, lam):
    """{logit parameter name: (its gradient in the float64 straightforward step,
    the contract's tolerance for it)}.  The tolerance (tests/parity.py) needs the
    upstream gradient at the layer's quantized weight: the sum over every use of
    it (the forward pass and the group lasso each run the quantizer)."""
    from parity import theta_tolerance

    from codeq.parametrize import iter_quantizers

    m = build_model(cfg)
    m.load_state_dict(state)
    m.double().train()
    outs = {}

    def keep(q, inputs, out):
        out.retain_grad()
        outs.setdefault(q, []).append(out)

    hooks = [q.register_forward_hook(keep) for _, _, q in iter_quantizers(m)]
    kw = cfg.loss_terms[0].kwargs
    loss = F.cross_entropy(m(x.double()), y) + lam * R.group_lasso(m, **kw)
    loss.backward()
    for h in hooks:
        h.remove()
    names = {id(p): n for n, p in m.named_parameters()}
    res = {}
    for _, module, q in iter_quantizers(m):
        w64 = module.parametrizations["weight"].original.detach()
        g64 = sum(o.grad for o in outs[q])
        for which, p in (("dz", q.logit_dz), ("bit", q.logit_bit)):
            if p.grad is not None:
                res[names[id(p)]] = (float(p.grad), theta_tolerance(q, w64, g64, which))
    return res


def test_optimizer_is_fused_unless_the_config_chooses():
    cfg = config("mlp")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert opt.defaults.get("fused") is True and all(g["fused"] for g in opt.param_groups)
    d = config("mlp")
    from codeq.train.config import config_to_dict

    raw = config_to_dict(d)
    raw["optimizer"]["param_groups"]["base"]["foreach"] = True
    cfg2 = config_from_dict(raw)
    opt2 = build_optimizer(cfg2, build_model(cfg2))
    assert not opt2.defaults.get("fused") and opt2.param_groups[0]["foreach"] is True


def _trainer(cfg, model):
    return Trainer(cfg, torch.device("cpu"), model, build_optimizer(cfg, model), None, None, None, torch.Generator())


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("learnable_bit", [True, False], ids=["lbit", "fixbit"])
def test_fused_weights_equal_per_layer_path_bitwise(model, learnable_bit, seed, monkeypatch):
    """fused_weights (one multi-layer call, group lasso fused) gives the bits of
    the per-layer path (fused_weights: false), and runs no per-layer quantizer."""
    from codeq.quantizers import DeadZoneLDZCompander
    from codeq.train.config import config_to_dict

    on_cfg = config(model, learnable_bit=learnable_bit)
    raw = config_to_dict(on_cfg)
    raw["fused_weights"] = False
    off_cfg = config_from_dict(raw)
    torch.manual_seed(seed)
    on_model = build_model(on_cfg)
    off_model = build_model(off_cfg)
    off_model.load_state_dict(on_model.state_dict())
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))

    calls = []
    orig = DeadZoneLDZCompander._quantize
    monkeypatch.setattr(DeadZoneLDZCompander, "_quantize", lambda self, w: calls.append(1) or orig(self, w))
    on = _trainer(on_cfg, on_model)
    calls.clear()  # the trainer's set-up forward pass (MACs for eval_bobs) ran the quantizers
    assert on.fast is not None
    loss_on, _, _ = on.compute_loss(x, y)
    assert calls == [], "the fast path ran a per-layer quantizer"
    loss_on.backward()
    off = _trainer(off_cfg, off_model)
    calls.clear()
    assert off.fast is None
    loss_off, _, _ = off.compute_loss(x, y)
    assert len(calls) == len(off.quantized)
    loss_off.backward()

    assert torch.equal(loss_on, loss_off), f"seed={seed}"
    g_on, g_off = grads(on_model), grads(off_model)
    assert g_on.keys() == g_off.keys()
    for k in g_on:
        assert torch.equal(g_on[k], g_off[k]), f"{k} differs (seed={seed})"


def test_fast_path_leaves_disabled_and_foreign_quantizers_to_their_parametrization(seed):
    """A disabled quantizer and a reference quantizer among fused ones: the same
    loss and gradients as the straightforward reference computation."""
    from torch.nn.utils import parametrize

    cfg = config("mlp")
    torch.manual_seed(seed)
    model = build_model(cfg)
    slow_cfg = config("mlp", True, "_ref_group_lasso")
    slow = build_model(slow_cfg)
    slow.load_state_dict(model.state_dict())
    layers = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    slow_layers = [m for m in slow.modules() if parametrize.is_parametrized(m, "weight")]
    # layer 0: disabled in both; layer 1: a reference quantizer in the fast model
    layers[0].parametrizations.weight[0].enabled = False
    slow_layers[0].parametrizations.weight[0].enabled = False
    ref_q = codeq.DeadZoneLDZCompander(init_deadzone_logit=1.2, init_bit_logit=0.5, reference=True)
    ref_q.load_state_dict(layers[1].parametrizations.weight[0].state_dict())
    layers[1].parametrizations.weight[0] = ref_q
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    tr = _trainer(cfg, model)
    loss, _, _ = tr.compute_loss(x, y)
    loss.backward()
    kw = slow_cfg.loss_terms[0].kwargs
    loss_slow = F.cross_entropy(slow(x), y) + 0.7 * R.group_lasso(slow, **kw)
    loss_slow.backward()
    torch.testing.assert_close(loss, loss_slow, rtol=1e-5, atol=1e-6)
    gf, gs = grads(model), grads(slow)
    assert gf.keys() == gs.keys()
    for k in gf:
        scale = gs[k].abs().max().clamp_min(1e-12)
        tol = 5e-3 if "logit_" in k else 1e-4
        assert (gf[k] - gs[k]).abs().max() / scale < tol, f"{k} (seed={seed})"


def test_fast_path_follows_toggling_between_steps(seed):
    """Switching quantizers off and on between steps: the fused call follows,
    with the per-layer path's loss every time."""
    from codeq import toggle_quantization
    from codeq.parametrize import iter_quantizers
    from codeq.train.config import config_to_dict

    on_cfg = config("resnet20")
    raw = config_to_dict(on_cfg)
    raw["fused_weights"] = False
    off_cfg = config_from_dict(raw)
    torch.manual_seed(seed)
    a = build_model(on_cfg)
    b = build_model(off_cfg)
    b.load_state_dict(a.state_dict())
    ta, tb = _trainer(on_cfg, a), _trainer(off_cfg, b)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    qa = [q for _, _, q in iter_quantizers(a)]
    qb = [q for _, _, q in iter_quantizers(b)]
    for step in range(4):
        if step == 1:
            toggle_quantization(a, False), toggle_quantization(b, False)
        elif step == 2:
            toggle_quantization(a, True), toggle_quantization(b, True)
            qa[1].enabled = qb[1].enabled = False
        elif step == 3:
            qa[1].enabled = qb[1].enabled = True
        la, _, _ = ta.compute_loss(x, y)
        lb, _, _ = tb.compute_loss(x, y)
        assert torch.equal(la, lb), f"step {step} (seed={seed})"


def test_hooked_or_subclassed_quantizers_keep_their_own_path():
    """A forward hook on a quantizer, or a subclass with its own forward, must
    run as written: such layers are not fused."""
    from codeq.fastpath import FusedWeights
    from codeq.parametrize import iter_quantizers
    from codeq.quantizers import DeadZoneLDZCompander

    model = build_model(config("mlp"))
    qs = [q for _, _, q in iter_quantizers(model)]
    seen = []
    qs[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))

    class Doubled(DeadZoneLDZCompander):
        def forward(self, w):
            return 2 * super().forward(w)

    from torch.nn.utils import parametrize

    layer = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")][1]
    d = Doubled(init_deadzone_logit=1.2, init_bit_logit=0.5)
    d.load_state_dict(layer.parametrizations.weight[0].state_dict())
    layer.parametrizations.weight[0] = d
    fast = FusedWeights(model, group_lasso=group_lasso_layers(model, 1e-3, 0.0))
    x = torch.randn(4, 3, 32, 32)
    own_path = []  # the quantizers that ran their own forward
    orig = DeadZoneLDZCompander._quantize
    DeadZoneLDZCompander._quantize = lambda self, w: own_path.append(self) or orig(self, w)
    try:
        with parametrize.cached(), fast.prefilled() as gl:
            out = model(x)
    finally:
        DeadZoneLDZCompander._quantize = orig
    assert own_path == [qs[0], d]  # the third layer was fused
    with parametrize.cached():
        w1 = layer.weight
        torch.testing.assert_close(w1, 2 * DeadZoneLDZCompander.forward(d, layer.parametrizations.weight.original))
        expect = R.group_lasso(model, lambda_linear=1e-3, lambda_conv=0.0)
    assert seen, "the forward hook did not run"
    torch.testing.assert_close(gl, expect, rtol=1e-5, atol=1e-7)
    assert out.shape == (4, 10)


def test_fast_path_results_live_for_the_block_only(seed):
    """The fused results are handed to the quantizers for one block: afterwards
    no quantizer holds one, and a weight changed after the block is quantized
    afresh (never a stale result), with or without parametrize.cached()."""
    from torch.nn.utils import parametrize

    from codeq.fastpath import FusedWeights
    from codeq.parametrize import iter_quantizers

    torch.manual_seed(seed)
    model = build_model(config("mlp"))
    fast = FusedWeights(model)
    qs = [q for _, _, q in iter_quantizers(model)]
    x = torch.randn(4, 3, 32, 32)
    with fast.prefilled():  # no cached(): every read returns the fused result
        assert all(q.given is not None for q in qs)
        first = model.net.fc1.weight
        assert model.net.fc1.weight is first
        out = model(x)
    assert all(q.given is None for q in qs)
    with torch.no_grad():
        model.net.fc1.parametrizations.weight.original.mul_(0.5)
    with parametrize.cached():
        ref = model(x)
    assert not torch.equal(out, ref)
    with parametrize.cached(), fast.prefilled():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    try:
        with fast.prefilled():
            raise KeyboardInterrupt  # an exception inside the block still releases them
    except KeyboardInterrupt:
        pass
    assert all(q.given is None for q in qs)


def test_fast_path_follows_a_state_dict_load_between_steps(seed):
    """Loading a state dict with other bit settings between steps (the
    quantizers' Python copy of them changes): the fused call follows."""
    from torch.nn.utils import parametrize

    from codeq.fastpath import FusedWeights

    torch.manual_seed(seed)
    model = build_model(config("mlp", learnable_bit=False))
    fast = FusedWeights(model)
    x = torch.randn(4, 3, 32, 32)
    with parametrize.cached(), fast.prefilled():
        model(x)
    sd = model.state_dict()
    for k in sd:
        if k.endswith("fixed_bit"):
            sd[k] = torch.tensor(2.0)
    model.load_state_dict(sd)
    with parametrize.cached(), fast.prefilled():
        out = model(x)
    ref = build_model(config("mlp", learnable_bit=False))
    ref.load_state_dict(sd)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


def test_fast_path_follows_a_replaced_logit_parameter(seed):
    """Replacing a quantizer's logit parameters (``q.logit_dz =
    nn.Parameter(...)``) between steps reaches the fused call: the quantized
    weights and the new parameter's gradient are those of the per-layer path."""
    from torch import nn
    from torch.nn.utils import parametrize

    from codeq.fastpath import FusedWeights
    from codeq.parametrize import iter_quantizers

    torch.manual_seed(seed)
    model = build_model(config("mlp"))
    fast = FusedWeights(model, group_lasso=group_lasso_layers(model, 1e-3, 0.0))
    x = torch.randn(4, 3, 32, 32)
    with parametrize.cached(), fast.prefilled():
        model(x).sum().backward()
    q = [q for _, _, q in iter_quantizers(model)][1]
    q.logit_dz = nn.Parameter(torch.tensor(0.4))
    q.logit_bit = nn.Parameter(torch.tensor(-1.1))
    with parametrize.cached(), fast.prefilled() as gl:
        (model(x).sum() + gl).backward()
    g_dz, g_bit = q.logit_dz.grad.clone(), q.logit_bit.grad.clone()
    assert g_dz.abs() > 0 and g_bit.abs() > 0
    ref = build_model(config("mlp"))
    rq = [q for _, _, q in iter_quantizers(ref)][1]
    rq.logit_dz, rq.logit_bit = nn.Parameter(torch.tensor(0.4)), nn.Parameter(torch.tensor(-1.1))
    ref.load_state_dict(model.state_dict())
    from codeq.losses import group_lasso

    (ref(x).sum() + group_lasso(ref, lambda_linear=1e-3, lambda_conv=0.0)).backward()
    torch.testing.assert_close(g_dz, rq.logit_dz.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(g_bit, rq.logit_bit.grad, rtol=1e-5, atol=1e-9)


def test_fast_path_rereads_logits_that_are_not_parameters(seed):
    """A quantizer subclass that keeps its dead-zone logit as a buffer (same
    math, so still fused): a buffer replaced between steps reaches the fused
    call."""
    from torch.nn.utils import parametrize

    from codeq.fastpath import FusedWeights
    from codeq.quantizers import DeadZoneLDZCompander

    class BufferLogit(DeadZoneLDZCompander):
        pass

    torch.manual_seed(seed)
    model = build_model(config("mlp"))
    layer = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")][1]
    q = BufferLogit(init_deadzone_logit=1.5, init_bit_logit=0.5)
    del q.logit_dz
    q.register_buffer("logit_dz", torch.tensor(1.5))
    layer.parametrizations.weight[0] = q
    fast = FusedWeights(model)
    x = torch.randn(4, 3, 32, 32)
    original = layer.parametrizations.weight.original
    for value in (1.5, 0.3):
        q.logit_dz = torch.tensor(value)  # a new buffer tensor each time
        with parametrize.cached(), fast.prefilled():
            assert q.given is not None  # fused
            w_fast = layer.weight.detach().clone()
        want = DeadZoneLDZCompander.forward(q, original).detach()
        assert torch.equal(w_fast, want), value


@pytest.mark.parametrize("lam", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_layer"])
def test_loss_term_weight_is_applied_exactly(lam, fused, seed):
    """compute_loss is CE + lambda * term, bit for bit in the loss and every
    gradient, whatever lambda, fused or not."""
    from torch.nn.utils import parametrize

    from codeq.fastpath import FusedWeights

    cfg = config("mlp")
    cfg.loss_terms[0].lam = lam
    cfg.fused_weights = fused
    torch.manual_seed(seed)
    a = build_model(cfg)
    b = build_model(cfg)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    tr = Trainer(cfg, torch.device("cpu"), a, build_optimizer(cfg, a), None, None, None, torch.Generator())
    assert (tr.fast is not None) == fused
    loss_a, parts, _ = tr.compute_loss(x, y)
    ce_a = parts["ce"]
    loss_a.backward()

    kw = cfg.loss_terms[0].kwargs
    fast = FusedWeights(b, group_lasso=group_lasso_layers(b, **kw)).prefilled() if fused else contextlib.nullcontext()
    with parametrize.cached(), fast as gl:
        ce_b = F.cross_entropy(b(x), y)
        term = gl if fused else codeq.LOSS_REGISTRY["group_lasso"](b, **kw)
        loss_b = ce_b + lam * term  # the product always taken
    loss_b.backward()
    assert torch.equal(ce_a, ce_b) and torch.equal(loss_a, loss_b), (loss_a, loss_b)
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and any("logit_dz" in k for k in ga)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
