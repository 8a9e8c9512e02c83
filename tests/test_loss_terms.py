"""Loss terms as objects (codeq/train/terms.py): built from the config once,
steered through handles, fused by what they declare, with one default per
argument."""

import inspect

import pytest
import torch
from torch import nn

from codeq import reference
from codeq.losses import GROUP_LASSO_LAMBDA, group_lasso, group_lasso_layers, group_lasso_of
from codeq.quantizers import DeadZoneLDZCompander, UniformSymmetric
from codeq.registry import LOSS_REGISTRY, register_loss
from codeq.train.config import config_from_dict
from codeq.train.trainer import Trainer
from test_train_cli import tiny


def linear_layers(model, scale=1e-3):
    """A user's group lasso over the Linear layers only."""
    return [(m, float(scale)) for m in model.modules() if isinstance(m, nn.Linear)]


CALLS = []


def linear_lasso(model, scale=1e-3):
    CALLS.append(scale)
    return group_lasso_of([(m.weight, lam) for m, lam in linear_layers(model, scale)], model)


@pytest.fixture
def user_terms():
    """Two user terms with the same math: one declares itself a group lasso, one does not."""
    register_loss("_declared", group_lasso_layers=linear_layers)(linear_lasso)
    LOSS_REGISTRY["_undeclared"] = lambda model, scale=1e-3: linear_lasso(model, scale)
    CALLS.clear()
    yield
    del LOSS_REGISTRY["_declared"], LOSS_REGISTRY["_undeclared"]
    del linear_lasso.group_lasso_layers


def trainer(tmp_path, terms, fused=True) -> Trainer:
    return Trainer.from_config(config_from_dict(tiny(tmp_path, loss_terms=terms, fused_weights=fused)), "cpu")


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_terms_are_built_once_with_names_keys_and_every_default(tmp_path):
    tr = trainer(tmp_path, [{"name": "group_lasso", "lambda": 0.5, "kwargs": {"lambda_linear": 0.01}},
                            {"name": "theta_l2", "kwargs": {"lambda_dz": 0.02}},
                            {"name": "group_lasso"}])
    a, b, c = tr.loss_terms
    assert [t.key for t in tr.loss_terms] == ["group_lasso_0", "theta_l2", "group_lasso_2"]
    assert (a.index, a.name, a.fn, a.strength) == (0, "group_lasso", group_lasso, 0.5)
    assert a.kwargs == {"lambda_linear": 0.01, "lambda_conv": GROUP_LASSO_LAMBDA}
    assert b.kwargs == {"lambda_dz": 0.02, "lambda_bit": 0.0}
    assert b.title == "loss term loss_terms[1] (theta_l2)"
    assert tr.fast_term is a  # the first term that declares a fusable group lasso
    x, y = batch()
    assert tr.train_step(x, y).names == ("loss", "ce", a.value_name, b.value_name, c.value_name, "correct")


def test_the_fused_path_is_chosen_by_the_declaration(tmp_path, user_terms):
    x, y = batch()
    declared = trainer(tmp_path, [{"name": "_declared", "kwargs": {"scale": 2e-3}}])
    assert declared.fast_term is declared.loss_terms[0]
    assert sorted(set(declared.fast.gl_lambda.values())) == [2e-3] and len(declared.fast.gl_lambda) == 2
    loss_d, parts_d, _ = declared.compute_loss(x, y)
    assert CALLS == []  # computed inside the quantizers' fused call, fn never called

    undeclared = trainer(tmp_path, [{"name": "_undeclared", "kwargs": {"scale": 2e-3}}])
    assert undeclared.fast is not None and undeclared.fast_term is None and not undeclared.fast.gl_layers
    loss_u, parts_u, _ = undeclared.compute_loss(x, y)
    assert CALLS == [2e-3]
    # the same value either way: the fused kernels' group lasso is the per-layer one bit for bit
    assert torch.equal(parts_d["term:_declared"], parts_u["term:_undeclared"]) and torch.equal(loss_d, loss_u)


def test_a_knob_on_a_fused_term_reaches_the_fused_path(tmp_path):
    x, y = batch()
    fused = trainer(tmp_path, [{"name": "group_lasso", "kwargs": {"lambda_linear": 1e-3, "lambda_conv": 0.0}}])
    plain = trainer(tmp_path, [{"name": "group_lasso", "kwargs": {"lambda_linear": 5e-3, "lambda_conv": 0.0}}],
                    fused=False)
    knob = fused.loss_terms[0].knob("lambda_linear")
    assert knob.get() == 1e-3
    knob.set(5e-3)
    loss_f, parts_f, _ = fused.compute_loss(x, y)
    assert fused.fast_term is fused.loss_terms[0] and set(fused.fast.gl_lambda.values()) == {5e-3}
    loss_p, parts_p, _ = plain.compute_loss(x, y)
    assert torch.equal(parts_f["term:group_lasso"], parts_p["term:group_lasso"]) and torch.equal(loss_f, loss_p)


def test_the_group_lasso_default_is_read_from_one_place(tmp_path, monkeypatch):
    """The trainer's fused and per-layer paths take group_lasso's own default
    (its signature): changing it there changes both."""
    for fn in (group_lasso, group_lasso_layers, reference.group_lasso):
        sig = inspect.signature(fn).parameters
        assert sig["lambda_linear"].default == sig["lambda_conv"].default == GROUP_LASSO_LAMBDA, fn
    monkeypatch.setattr(group_lasso, "__defaults__", (0.5, 0.25))
    x, y = batch()
    fused, plain = trainer(tmp_path, [{"name": "group_lasso"}]), trainer(tmp_path, [{"name": "group_lasso"}], False)
    assert fused.loss_terms[0].kwargs == plain.loss_terms[0].kwargs == {"lambda_linear": 0.5, "lambda_conv": 0.25}
    assert set(fused.fast.gl_lambda.values()) == {0.5}  # the MLP's Linear layers
    loss_f, parts_f, _ = fused.compute_loss(x, y)
    loss_p, parts_p, _ = plain.compute_loss(x, y)
    assert torch.equal(loss_f, loss_p) and parts_f["term:group_lasso"] > 0


def test_the_reference_keeps_the_quantizers_defaults():
    """codeq.reference is a leaf (it imports nothing of codeq), so it spells its
    defaults out: they must be the quantizers'."""
    q = inspect.signature(DeadZoneLDZCompander).parameters
    for fn in (reference.deadzone_bitwidth, reference.deadzone_scalars, reference.deadzone_quantize):
        r = inspect.signature(fn).parameters
        assert r["fixed_bit"].default == q["fixed_bit_val"].default, fn
        assert (r["min_bits"].default, r["max_bits"].default) == (q["min_bits"].default, q["max_bits"].default), fn
    assert (inspect.signature(reference.uniform_quantize).parameters["bitwidth"].default
            == inspect.signature(UniformSymmetric).parameters["bitwidth"].default)
