"""codeq/train/optim.py: the lean fused Adam/AdamW step updates parameters and
state bit for bit like torch's fused optimizer, and steps aside where it must."""

import copy

import pytest
import torch

from codeq.train.optim import LeanFusedStep, lean_class


@pytest.fixture
def lean_used(monkeypatch):
    """Counts the steps that took the lean path (not torch's own step)."""
    used = {"n": 0}
    orig = LeanFusedStep._lean_calls

    def spy(self):
        r = orig(self)
        used["n"] += r is not None
        return r

    monkeypatch.setattr(LeanFusedStep, "_lean_calls", spy)
    return used


def make_params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (64,), (10, 64), (), (), ()]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def groups_of(ps):
    return [{"params": ps[:3], "lr": 1e-2, "weight_decay": 0.05},
            {"params": ps[3:5], "lr": 3e-2, "weight_decay": 2.5},
            {"params": ps[5:], "lr": 5e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]


def run(cls, seed, steps=6, skip_grad_at=2, **kw):
    ps = make_params(seed)
    opt = cls(groups_of(ps), fused=True, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        for i, p in enumerate(ps):
            if k == skip_grad_at and i == 4:
                continue  # a parameter without a gradient this step
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
    return ps, opt


@pytest.mark.parametrize("base", [torch.optim.AdamW, torch.optim.Adam], ids=["adamw", "adam"])
def test_lean_step_is_bitwise_torch(base, seed, lean_used):
    lean_ps, lean_opt = run(lean_class(base), seed, weight_decay=0.0)
    ref_ps, ref_opt = run(base, seed, weight_decay=0.0)
    # torch's own step ran only on the first step (it creates the state)
    assert lean_used["n"] == 5
    for a, b in zip(lean_ps, ref_ps):
        assert torch.equal(a, b)
    sa, sb = lean_opt.state_dict(), ref_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sb["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)


def test_state_dicts_are_interchangeable(seed):
    ps, opt = run(lean_class(torch.optim.AdamW), seed, steps=3)
    ref = torch.optim.AdamW(groups_of([torch.nn.Parameter(p.detach().clone()) for p in ps]), fused=True)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict shares tensors)
    back = lean_class(torch.optim.AdamW)(groups_of([torch.nn.Parameter(p.detach().clone()) for p in ps]), fused=True)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    for p_ref, p_back in zip(ref.param_groups[0]["params"], back.param_groups[0]["params"]):
        p_ref.grad = torch.ones_like(p_ref)
        p_back.grad = torch.ones_like(p_back)
    for g in (ref.param_groups[1:] + back.param_groups[1:]):
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    ref.step()
    back.step()
    for a, b in zip([p for g in ref.param_groups for p in g["params"]], [p for g in back.param_groups for p in g["params"]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["amsgrad", "closure", "grad_scale"])
def test_falls_back_to_torch(case, seed, lean_used):
    cls = lean_class(torch.optim.AdamW)
    ps = make_params(seed)
    opt = cls(groups_of(ps), fused=True, amsgrad=(case == "amsgrad"))
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = torch.optim.AdamW(groups_of(ref_ps), fused=True, amsgrad=(case == "amsgrad"))
    if case == "grad_scale":
        for o in (opt, ref):
            o.grad_scale, o.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    for k in range(3):
        for a, b in zip(ps, ref_ps):
            a.grad = torch.full_like(a, 0.1 * (k + 1))
            b.grad = torch.full_like(b, 0.1 * (k + 1))
        if case == "closure":
            assert opt.step(lambda: torch.tensor(1.0)) == torch.tensor(1.0)
            ref.step(lambda: torch.tensor(1.0))
        else:
            opt.step()
            ref.step()
    assert lean_used["n"] == 0
    for a, b in zip(ps, ref_ps):
        assert torch.equal(a, b)


def test_only_adam_classes_change():
    assert lean_class(torch.optim.SGD) is torch.optim.SGD
    cls = lean_class(torch.optim.AdamW)
    assert issubclass(cls, torch.optim.AdamW) and cls is lean_class(torch.optim.AdamW)
