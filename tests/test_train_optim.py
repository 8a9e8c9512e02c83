"""codeq/train/optim.py: the lean fused Adam/AdamW step updates parameters and
state bit for bit like torch's fused optimizer, and steps aside where it must."""

import copy
import math

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


# ------------------------------------------------------ per-group optimizers --
def _mixed(ps, sgd_cls=torch.optim.SGD, adam_cls=torch.optim.AdamW):
    from codeq.train.optim import PerGroupOptimizer

    return PerGroupOptimizer([
        sgd_cls([{"params": ps[:3], "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "name": "base"}]),
        adam_cls([{"params": ps[3:5], "lr": 3e-2, "weight_decay": 0.0, "name": "dz"},
                  {"params": ps[5:], "lr": 5e-3, "weight_decay": 0.0, "name": "bit"}])])


def _grads(ps, g):
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def test_per_group_optimizer_is_its_parts(seed):
    """SGD for the weights and AdamW for the logits, stepped as one optimizer,
    equal bit for bit to the two torch optimizers stepped by hand; an LR
    scheduler and a budget's weight-decay writer reach the parts through the
    shared group dicts; state_dict / load_state_dict continue exactly."""
    ps, ref = make_params(seed), make_params(seed)
    opt = _mixed(ps)
    ref_sgd = torch.optim.SGD([{"params": ref[:3], "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}])
    ref_adam = torch.optim.AdamW([{"params": ref[3:5], "lr": 3e-2, "weight_decay": 0.0},
                                  {"params": ref[5:], "lr": 5e-3, "weight_decay": 0.0}])
    assert [g["name"] for g in opt.param_groups] == ["base", "dz", "bit"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref_sched = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (ref_sgd, ref_adam)]
    g, h = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for k in range(3):
        _grads(ps, g)
        _grads(ref, h)
        if k == 1:  # a budget writes a strength into one group
            next(x for x in opt.param_groups if x["name"] == "dz")["weight_decay"] = 0.5
            ref_adam.param_groups[0]["weight_decay"] = 0.5
        opt.step()
        ref_sgd.step()
        ref_adam.step()
        sched.step()
        for s in ref_sched:
            s.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ref))
    assert [x["lr"] for x in opt.param_groups] == [0.1 / 8, 3e-2 / 8, 5e-3 / 8]
    # a copy from the state dict continues exactly like the original
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = _mixed(ps2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.parts[1].param_groups[0] is opt2.param_groups[1] and opt2.parts[0].state is opt2.state
    for _ in range(2):
        _grads(ps, g)
        for p2, p in zip(ps2, ps):
            p2.grad = p.grad.clone()
        opt.step()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


def test_per_group_optimizer_from_a_config():
    """optimizer.param_groups.<g>.type: one torch optimizer per type, extras checked against the group's own
    optimizer; one type for all groups keeps a plain torch optimizer; cuda_graph needs one optimizer."""
    from codeq.train.config import ConfigError, config_from_dict
    from codeq.train.optim import PerGroupOptimizer, build_optimizer, graph_capable
    from codeq.train.trainer import build_run_model

    d = {"model": "mlp", "model_kwargs": {"hidden": [8]}, "epochs": 2,
         "quantizer": {"name": "deadzone", "kwargs": {"learnable_bit": True}},
         "optimizer": {"type": "sgd", "param_groups": {"base": {"lr": 0.1, "momentum": 0.9},
                                                       "dz": {"type": "adamw", "lr": 0.01, "betas": [0.8, 0.99]},
                                                       "bit": {"type": "adamw", "lr": 0.02}}}}
    cfg = config_from_dict(d)
    opt = build_optimizer(cfg, build_run_model(cfg))
    assert isinstance(opt, PerGroupOptimizer) and not graph_capable(cfg)
    assert [type(p).__name__ for p in opt.parts] == ["SGD", "LeanAdamW"]
    assert [(g["name"], g["lr"]) for g in opt.parts[1].param_groups] == [("dz", 0.01), ("bit", 0.02)]
    assert opt.param_groups[1]["betas"] == (0.8, 0.99)
    bad = copy.deepcopy(d)
    bad["optimizer"]["param_groups"]["dz"]["momentum"] = 0.9  # an SGD key on an AdamW group
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.param_groups.dz.momentum' for optimizer 'adamw'"):
        config_from_dict(bad)
    with pytest.raises(ConfigError, match="one optimizer for every parameter group"):
        config_from_dict({**d, "cuda_graph": True})
    same = copy.deepcopy(d)
    same["optimizer"]["param_groups"]["dz"] = {"type": "sgd", "lr": 0.01}
    same["optimizer"]["param_groups"]["bit"] = {"lr": 0.01}
    assert isinstance(build_optimizer(config_from_dict(same), build_run_model(config_from_dict(same))),
                      torch.optim.SGD)


@pytest.mark.parametrize("sched", ["cosine", "none"])
def test_warmup_then_the_schedule(sched):
    """warmup_epochs N: epoch i of the first N at i/(N+1) of the lr, then the cosine over the rest (or flat);
    a config error with a scheduler of the registry's own or N >= epochs."""
    from codeq.registry import SCHEDULER_REGISTRY
    from codeq.train.config import ConfigError, config_from_dict
    from codeq.train.optim import build_scheduler

    d = {"model": "mlp", "epochs": 6, "warmup_epochs": 2, "lr_scheduler": sched,
         "optimizer": {"type": "sgd", "param_groups": {"base": {"lr": 0.3}}}}
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    s = build_scheduler(config_from_dict(d), opt)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    cos = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    want = [0.1, 0.2] + ([0.3 * c for c in cos] if sched == "cosine" else [0.3] * 4)
    assert lrs == pytest.approx(want, rel=1e-12)
    assert isinstance(s.state_dict()["lr_lambdas"][0], type(None))  # nothing but builtins in a checkpoint
    with pytest.raises(ConfigError, match="fewer than epochs"):
        config_from_dict({**d, "warmup_epochs": 6})
    SCHEDULER_REGISTRY["step3"] = lambda o, c: torch.optim.lr_scheduler.StepLR(o, 3)
    try:
        with pytest.raises(ConfigError, match="warmup_epochs works with lr_scheduler cosine or none"):
            config_from_dict({**d, "lr_scheduler": "step3"})
    finally:
        del SCHEDULER_REGISTRY["step3"]


def test_the_private_torch_names_of_the_lean_step_exist():
    """The lean step calls private torch functions (kept: benchmarks/results/ab_special_paths.md,
    "lean fused AdamW step"); a torch without them gets torch's own optimizers, and this fails."""
    from codeq.train.optim import LEAN_TORCH_NAMES, LeanAdamW

    missing = [n for n in LEAN_TORCH_NAMES if not callable(getattr(torch, n, None))]
    assert not missing, (f"torch {torch.__version__} has no torch.{', torch.'.join(missing)}: codeq's lean fused "
                         "Adam/AdamW step (codeq/train/optim.py) is off; port it or remove it")
    assert lean_class(torch.optim.AdamW) is LeanAdamW
