"""Training to a budget: the config's checks, the controller's schedule and
bounds, the metrics against the report and the export, resume, milestones."""

from __future__ import annotations

import copy
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

from codeq.checkpoint import load_checkpoint
from codeq.export import export_model
from codeq.losses import theta_l2
from codeq.models import build_model, example_input
from codeq.report import METRICS, CompressionMeter, compression_report, layer_macs
from codeq.report import main as report_main
from codeq.train.budget import BudgetController, Knob, Setting, group_setting
from codeq.train.cli import main
from codeq.train.config import ConfigError, config_from_dict
from codeq.train.optim import PerGroupOptimizer
from codeq.train.trainer import Trainer
from test_train_cli import read_metrics, run_dirs, tiny, write
from test_train_ddp import torchrun


def budget_cfg(tmp_path, budget, **over):
    d = tiny(tmp_path, **over)
    d["budget"] = budget
    return d


def strengths(d) -> dict:
    """{name: configured value} of the strengths the config's budget steers."""
    return {s.name: s.value for s in config_from_dict(d).budget_strengths()}


def bcfg(**kw):
    base = dict(metric="rel_bops", target=0.05, milestones=[], reach_by=0.8, tolerance=0.1, kp=4.0, ki=2.0,
                max_factor=10.0)
    base.update(kw)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------- config --
@pytest.mark.parametrize("budget, over, words", [
    ({"metric": "flops", "target": 0.1}, {}, "unknown budget metric 'flops'"),
    ({"metric": "rel_bops", "target": 1.5}, {}, "rel_bops must be in (0, 1]"),
    ({"metric": "rel_bops", "target": 0.0}, {}, "rel_bops must be in (0, 1]"),
    ({"metric": "sparsity", "target": 1.0}, {}, "sparsity must be in (0, 1)"),
    ({"metric": "sparsity", "target": 0}, {}, "sparsity must be in (0, 1)"),
    ({"metric": "size_bytes", "target": -3}, {}, "size_bytes must be more than 0"),
    ({"metric": "bits", "target": 9}, {"learnable_bit": True}, "within the quantizer's min_bits..max_bits (2..8)"),
    ({"metric": "bits", "target": 4}, {"learnable_bit": False}, "needs learnable bit-widths"),
    ({"metric": "rel_bops"}, {}, "needs either target or milestones"),
    ({"metric": "rel_bops", "target": 0.1, "milestones": [0.2]}, {}, "needs either target or milestones"),
    ({"metric": "rel_bops", "milestones": [0.1, 0.2]}, {}, "strictly decreasing"),
    ({"metric": "sparsity", "milestones": [0.9, 0.5]}, {}, "strictly increasing"),
    ({"metric": "rel_bops", "target": 0.1, "reach_by": 1.5}, {}, "must be in (0, 1]"),
    ({"metric": "rel_bops", "target": 0.1, "tolerance": 0}, {}, "must be in (0, 1)"),
    ({"metric": "rel_bops", "target": 0.1, "kp": 0, "ki": 0}, {}, "never act"),
    ({"metric": "rel_bops", "target": 0.1, "max_factor": 0}, {}, "max_factor must be more than 0"),
    ({"metric": "rel_bops", "target": 0.1, "speed": 2}, {}, "unknown key 'budget.speed'"),
])
def test_bad_budgets_are_one_line_config_errors(tmp_path, budget, over, words):
    d = budget_cfg(tmp_path, budget)
    d["quantizer"]["kwargs"].update(over)
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_budget_needs_something_to_steer(tmp_path):
    d = budget_cfg(tmp_path, {"metric": "sparsity", "target": 0.5})
    d["optimizer"]["param_groups"]["dz"]["weight_decay"] = 0.0
    with pytest.raises(ConfigError, match="nothing to steer; set optimizer.param_groups.dz.weight_decay"):
        config_from_dict(d)
    d["loss_terms"].append({"name": "theta_l2", "kwargs": {"lambda_dz": 0.01}})  # the paper's form steers
    assert strengths(d) == {"loss_terms.1.kwargs.lambda_dz": 0.01}
    (s,) = config_from_dict(d).budget_strengths()
    assert (s.term, s.key, s.group) == (1, "lambda_dz", None)  # where it acts, no name to parse
    d["quantizer"] = {"name": "uniform"}
    with pytest.raises(ConfigError, match="needs the deadzone quantizer"):
        config_from_dict(d)
    del d["quantizer"]
    with pytest.raises(ConfigError, match="needs the deadzone quantizer"):
        config_from_dict(d)


def test_which_strengths_each_metric_steers(tmp_path):
    d = budget_cfg(tmp_path, {"metric": "rel_bops", "target": 0.1})
    d["optimizer"]["param_groups"]["bit"]["weight_decay"] = 1.0
    d["loss_terms"].append({"name": "theta_l2", "kwargs": {"lambda_dz": 0.01, "lambda_bit": 0.02}})
    dz = {"optimizer.param_groups.dz.weight_decay": 2.5, "loss_terms.1.kwargs.lambda_dz": 0.01}
    bit = {"optimizer.param_groups.bit.weight_decay": 1.0, "loss_terms.1.kwargs.lambda_bit": 0.02}
    assert strengths(d) == {**dz, **bit}  # learnable_bit defaults to true
    d["budget"] = {"metric": "sparsity", "target": 0.5}
    assert strengths(d) == dz
    d["budget"] = {"metric": "bits", "target": 4}
    assert strengths(d) == bit
    d["budget"] = {"metric": "size_bytes", "target": 1000}
    d["quantizer"]["kwargs"]["learnable_bit"] = False
    assert strengths(d) == dz


def test_cli_bad_budget_exits_2_with_one_line(tmp_path, capsys):
    cfg = write(tmp_path, budget_cfg(tmp_path, {"metric": "rel_bops", "target": 2}))
    assert main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: budget.target")
    assert not os.path.exists(tmp_path / "runs")


# ------------------------------------------------------------- controller --
def test_schedule_goes_geometrically_from_the_start_to_the_target():
    c = BudgetController(bcfg(target=0.05, reach_by=0.5), [], epochs=10, steps_per_epoch=10)
    c.begin(0.2)
    assert c.target_at(0) == pytest.approx(0.2)
    assert c.target_at(25) == pytest.approx(0.1)  # halfway in log space
    assert c.target_at(50) == pytest.approx(0.05) and c.target_at(100) == pytest.approx(0.05)
    s = BudgetController(bcfg(metric="sparsity", target=0.9, reach_by=1.0), [], epochs=1, steps_per_epoch=100)
    s.begin(0.0)  # density 1 -> 0.1: sparsity 1 - sqrt(0.1) halfway
    assert s.target_at(50) == pytest.approx(1 - math.sqrt(0.1))
    m = BudgetController(bcfg(target=None, milestones=[0.2, 0.1], reach_by=0.8), [], epochs=15, steps_per_epoch=10)
    m.begin(0.4)  # two segments of 60 steps: ramp 20, hold 40
    assert m.target_at(10) == pytest.approx(0.4 / math.sqrt(2))
    assert m.target_at(20) == m.target_at(59) == pytest.approx(0.2)
    assert m.target_at(70) == pytest.approx(0.2 / math.sqrt(2)) and m.target_at(140) == pytest.approx(0.1)


def test_lambda_is_never_negative_and_follows_the_error():
    written = {}
    knobs = [Knob("a", 2.5, Setting(lambda: [written], "a")), Knob("b", 0.01, Setting(lambda: [written], "b"))]
    c = BudgetController(bcfg(target=0.05), knobs, epochs=5, steps_per_epoch=20)
    assert written == {"a": 0.0, "b": 0.0}  # from the start, before any update
    c.begin(0.25)
    rng = random.Random(0)
    for step in range(1, 101):
        c.update(rng.uniform(0.001, 0.5), step)
        assert c.u >= 0 and written["a"] >= 0 and written["b"] >= 0
        assert written["a"] == pytest.approx(2.5 * c.u) and written["b"] == pytest.approx(0.01 * c.u)
    c.update(0.5, 101)  # far above the target: it pulls
    assert c.u > 0
    for step in range(102, 140):
        c.update(0.001, step)  # far below: it lets go completely
    assert c.u == 0 and written == {"a": 0.0, "b": 0.0}


def test_the_controller_stops_at_max_factor_without_winding_up():
    c = BudgetController(bcfg(target=0.01, max_factor=3.0), [], epochs=100, steps_per_epoch=10)
    c.begin(0.25)
    for step in range(1, 500):  # a plant that does not follow at all, for 50 epochs
        c.update(0.25, step)
        assert 0 <= c.u <= 3.0
    assert c.saturated and c.integral <= 3.0 / c.cfg.ki
    for step in range(500, 503):  # once it follows (and passes the target), the pull goes at once
        c.update(0.001, step)
    assert c.u == 0 and not c.saturated


def test_a_target_met_at_the_start_never_pulls():
    c = BudgetController(bcfg(target=0.5), [], epochs=2, steps_per_epoch=10)
    c.begin(0.25)
    for step in range(1, 21):
        c.update(0.25, step)
        assert c.u == 0 and c.target_at(step) == 0.5


def test_controller_state_round_trips():
    a = BudgetController(bcfg(target=None, milestones=[0.2, 0.1]), [], epochs=4, steps_per_epoch=10)
    a.begin(0.3)
    for step in range(1, 25):
        a.update(0.3 * 0.97 ** step, step)
    b = BudgetController(bcfg(target=None, milestones=[0.2, 0.1]), [], epochs=4, steps_per_epoch=10)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for step in range(25, 40):
        va = a.update(0.3 * 0.96 ** step, step)
        assert va == b.update(0.3 * 0.96 ** step, step)
    assert a.state_dict() == b.state_dict()


def test_milestone_is_due_after_an_epoch_held():
    c = BudgetController(bcfg(target=None, milestones=[0.2, 0.1], reach_by=1.0), [], epochs=12, steps_per_epoch=10)
    c.begin(0.4)  # segments of 60 steps: ramp 20, hold 40
    for step in range(1, 21):
        c.update(c.target_at(step), step)
        assert c.milestone_due() is None
    for step in range(21, 30):
        c.update(0.21, step)  # within 10 %
    assert c.milestone_due() is None
    c.update(0.15, 30)  # past it counts as held too
    assert c.milestone_due() == 0.2
    c.mark_saved(0.2, 3, 0.5)
    c.update(0.15, 31)
    assert c.milestone_due() is None and [s["target"] for s in c.saved] == [0.2]
    c.update(0.3, 61)
    assert c.summary()["missed_milestones"] == [0.1]


# ---------------------------------------------------------------- metrics --
def test_meter_is_the_report_and_the_export(tmp_path):
    torch.manual_seed(1)
    model = build_model("mlp", img_size=32, model_kwargs={"hidden": [32, 16]},
                        quantizer={"name": "deadzone", "kwargs": {"min_bits": 2, "max_bits": 8}})
    for q in model.modules():
        if hasattr(q, "logit_dz"):
            q.logit_dz.data.uniform_(0.1, 1.5)
            q.logit_bit.data.uniform_(0.1, 2.0)
    meter = CompressionMeter(model, layer_macs(model, example_input(32)))
    rel, sparsity, bits, size = meter.values().tolist()
    rep = compression_report(model, example_input(32), act_bits=32)
    assert rel == pytest.approx(rep["totals"]["relative_bops"], rel=1e-12)
    assert sparsity == pytest.approx(rep["totals"]["sparsity"], rel=1e-12)
    rows = rep["layers"]
    assert bits == pytest.approx(sum(r["params"] * r["bits"] for r in rows) / sum(r["params"] for r in rows))
    assert size == pytest.approx(export_model(model, str(tmp_path / "x"))["theoretical_bytes"], rel=1e-12)
    assert METRICS == ("rel_bops", "sparsity", "bits", "size_bytes")


# ---------------------------------------------------------------- trainer --
def test_a_met_target_does_not_prune_further(tmp_path):
    # an 8-bit model starts at rel_bops 8 x 32 / (32 x 32) = 0.25, already below 0.5
    d = budget_cfg(tmp_path, {"metric": "rel_bops", "target": 0.5}, loss_terms=[], epochs=3)
    d["optimizer"]["param_groups"]["dz"] = {"lr": 0.01, "weight_decay": 50.0}  # would prune hard if applied
    assert main(["--config", write(tmp_path, d)]) == 0
    (run,) = run_dirs(tmp_path)
    recs = read_metrics(run)
    assert all(r["budget"]["u"] == 0 and r["budget"]["lambdas"] == {"optimizer.param_groups.dz.weight_decay": 0.0}
               for r in recs)
    assert recs[-1]["sparsity_total"] < 0.05  # as built: the dead zone barely prunes
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    assert ckpt["budget"]["u"] == 0.0
    wd = [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"] if g["name"] == "dz"]
    assert wd == [0.0]


@pytest.mark.parametrize("per_group", [False, True], ids=["one_optimizer", "per_group_optimizer"])
def test_group_setting_writes_the_group_load_state_dict_put_in_place(tmp_path, per_group):
    """load_state_dict replaces the param-group dicts (and, for a
    PerGroupOptimizer, points its parts at the new ones): the budget's handle
    writes the dict the optimizer steps with now."""
    d = budget_cfg(tmp_path, {"metric": "sparsity", "target": 0.5})
    if per_group:
        d["optimizer"]["param_groups"]["base"]["type"] = "sgd"
    tr = Trainer.from_config(config_from_dict(d), "cpu")
    assert isinstance(tr.optimizer, PerGroupOptimizer) == per_group
    (knob,) = tr.budget.knobs
    assert knob.name == "optimizer.param_groups.dz.weight_decay" and knob.setting.get() == 0.0  # u starts at 0

    def dz_group():
        (g,) = [g for g in tr.optimizer.param_groups if g["name"] == "dz"]
        return g

    before = dz_group()
    tr.optimizer.load_state_dict(tr.optimizer.state_dict())
    after = dz_group()
    assert after is not before
    tr.budget.u = 3.0
    tr.budget.apply()
    assert after["weight_decay"] == 7.5 == knob.setting.get() and before["weight_decay"] == 0.0
    stepping = [g for part in getattr(tr.optimizer, "parts", [tr.optimizer]) for g in part.param_groups]
    assert any(g is after for g in stepping)
    # the same through a handle made by hand
    group_setting(tr.optimizer, "dz", "weight_decay").set(1.25)
    assert after["weight_decay"] == 1.25


def test_a_loss_term_knob_writes_what_the_loss_then_uses(tmp_path):
    d = budget_cfg(tmp_path, {"metric": "sparsity", "target": 0.5})
    d["optimizer"]["param_groups"]["dz"]["weight_decay"] = 0.0
    d["loss_terms"].append({"name": "theta_l2", "kwargs": {"lambda_dz": 0.05}})
    tr = Trainer.from_config(config_from_dict(d), "cpu")
    (knob,) = tr.budget.knobs
    term = tr.loss_terms[1]
    assert knob.name == "loss_terms.1.kwargs.lambda_dz" and term.name == "theta_l2"
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for u in (0.0, 2.0, 0.5):
        tr.budget.u = u
        tr.budget.apply()
        assert term.kwargs["lambda_dz"] == knob.setting.get() == u * 0.05
        loss, parts, _ = tr.compute_loss(x, y)
        want = theta_l2(tr.model, lambda_dz=u * 0.05)
        assert torch.equal(parts[term.value_name], want) and (want > 0) == (u > 0)
        rest = parts["ce"] + parts[tr.loss_terms[0].value_name]
        assert torch.equal(loss, rest + want)


def test_budget_state_survives_resume_bit_for_bit(tmp_path):
    d = budget_cfg(tmp_path, {"metric": "rel_bops", "target": 0.02}, epochs=2, log_interval=1,
                   dataset={"name": "synthetic", "train_size": 64, "val_size": 32, "augment": "standard"})
    d["loss_terms"].append({"name": "theta_l2", "kwargs": {"lambda_dz": 0.05}})
    cfg = write(tmp_path, d)
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'straight'}"]) == 0
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'split'}", "--stop-after", "1"]) == 0
    (split,) = run_dirs(tmp_path, "split")
    ckpt_path = os.path.join(split, "checkpoint.th")
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 'split'}", "--resume", ckpt_path]) == 0
    (straight,) = run_dirs(tmp_path, "straight")
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["budget"] for r in a] == [r["budget"] for r in b]
    assert a[-1]["budget"]["u"] > 0  # the controller acted, so resuming it is tested
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    ca, cb = load_checkpoint(os.path.join(straight, "checkpoint.th")), load_checkpoint(ckpt_path)
    assert ca["budget"] == cb["budget"]
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k


def test_milestones_are_saved_exported_and_drawn(tmp_path, capsys):
    # sparsity 0 -> 0.02 -> 0.05 on a model whose dead zone is wide from the start: each held at once
    d = budget_cfg(tmp_path, {"metric": "sparsity", "milestones": [0.02, 0.05], "reach_by": 1.0}, epochs=4,
                   loss_terms=[])
    d["quantizer"]["kwargs"]["init_deadzone_logit"] = 0.3
    assert main(["--config", write(tmp_path, d)]) == 0
    out = capsys.readouterr().out
    (run,) = run_dirs(tmp_path)
    recs = read_metrics(run)
    saved = [r["milestone"] for r in recs if "milestone" in r]
    assert [m["target"] for m in saved] == [0.02, 0.05] and [m["epoch"] for m in saved] == [2, 4]
    for m in saved:
        assert m["value"] >= m["target"] * 0.9
        assert os.path.isfile(os.path.join(run, f"milestone-{m['target']:g}.th"))
        assert os.path.isfile(os.path.join(run, f"milestone-{m['target']:g}", "layout.json"))
    assert "milestone sparsity 0.02 held for an epoch" in out and "budget: sparsity target 0.05, reached" in out
    summary = json.load(open(os.path.join(run, "budget.json")))
    assert summary["missed_milestones"] == [] and len(summary["milestones"]) == 2
    chart = tmp_path / "chart.png"
    assert report_main([run, "--out", str(chart)]) == 0
    assert (tmp_path / "milestones.png").stat().st_size > 10_000 and chart.is_file()
    assert "0.05" in capsys.readouterr().out
    # records without relative_bops (runs of older codeq): no BOPs chart, but the milestones are still drawn
    for r in recs:
        r.pop("relative_bops", None)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "milestones.png").unlink()
    assert report_main([run, "--out", str(chart)]) == 0
    assert (tmp_path / "milestones.png").is_file() and "logged no relative_bops" in capsys.readouterr().out


def test_budget_under_ddp_follows_the_single_process_run(tmp_path):
    """2 processes x batch 8 with a budget follow 1 process x batch 16 (the
    metric all-reduced from rank 0 at every update); rank 0 alone reports."""
    d = budget_cfg(tmp_path, {"metric": "rel_bops", "target": 0.05}, epochs=2, log_interval=1, batch_size=8,
                   dataset={"name": "synthetic", "train_size": 64, "val_size": 32, "augment": "none"})
    cfg = write(tmp_path, d)
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 's'}", "--set", "batch_size=16"]) == 0
    r = torchrun(["--config", cfg, "--set", f"save_dir={tmp_path / 'd'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (s_run,), (d_run,) = run_dirs(tmp_path, "s"), run_dirs(tmp_path, "d")
    bs, bd = [x["budget"] for x in read_metrics(s_run)], [x["budget"] for x in read_metrics(d_run)]
    assert bs[-1]["u"] > 0
    for a, b in zip(bs, bd):
        assert b["value"] == pytest.approx(a["value"], rel=1e-3) and b["u"] == pytest.approx(a["u"], rel=1e-2)
    assert r.stdout.count("budget: rel_bops target 0.05") == 1  # rank 0 reports


def test_a_saturated_controller_warns_once(tmp_path, capsys):
    d = budget_cfg(tmp_path, {"metric": "rel_bops", "target": 0.01, "max_factor": 0.001}, epochs=2, loss_terms=[])
    assert main(["--config", write(tmp_path, d)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: budget: the controller is at its limit (budget.max_factor 0.001") == 1
    (run,) = run_dirs(tmp_path)
    assert all(r["budget"]["u"] == 0.001 for r in read_metrics(run))
