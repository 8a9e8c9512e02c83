"""Relative BOPs per epoch: the paper's (``relative_bops``, every run, equal to
the compression report's) and the published trainer's (``eval_bobs``, under its
own name ``published_bops``): the three published config keys, the formula
against a hand computation, the epoch records, metrics.jsonl, the console line
and the pictures -- one name, one figure."""

from __future__ import annotations

import json
import pathlib
import os
import re

import pytest
import torch

from codeq.checkpoint import load_model
from codeq.report import relative_bops
from codeq.train.cli import main
from codeq.train.config import config_from_dict
from codeq.train.trainer import Trainer
from codeq.train.values import Named
from test_train_cli import read_metrics, write


def cfg_dict(tmp_path, **over) -> dict:
    d = {
        "model": "mlp",
        "model_kwargs": {"hidden": [16, 12]},
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
        "workers": 0,
        "save_dir": str(tmp_path / "runs"),
        "run_name": "b",
        "dataset": {"name": "synthetic", "train_size": 48, "val_size": 16},
        "quantizer": {"name": "deadzone", "kwargs": {"max_bits": 8, "init_bit_logit": 0.6}, "exclude_layers": []},
        "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.001}, "dz": {"lr": 0.01}}},
        "loss_terms": [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 0.001}}],
        # the published trainer's three keys
        "eval_bobs": True,
        "default_weight_bitrate": 8,
        "default_activation_bitrate": 8,
    }
    d.update(over)
    return d


def _published(layers, wb, ab):
    """The published calculator, written out: every Linear in module order, its
    output rows pruned (all-zero rows of the weight) and the previous layer's."""
    num = den = prev = 0.0
    for macs, zero_rows, rows, bits in layers:
        r = zero_rows / rows
        num += (1 - prev) * (1 - r) * macs * bits * ab
        den += macs * wb * ab
        prev = r
    return num / den


def test_relative_bops_against_a_hand_computation(tmp_path):
    """MLP 3072-16-12-10: fc1 and fc2 4-bit quantized with zero rows, fc3 not
    quantized (default weight bits); 6-bit reference weights, 4-bit activations."""
    d = cfg_dict(tmp_path, default_weight_bitrate=6, default_activation_bitrate=4,
                 quantizer={"name": "deadzone", "kwargs": {"fixed_bit_val": 4, "learnable_bit": False},
                            "exclude_layers": ["fc3"]})
    t = Trainer.from_config(config_from_dict(d), "cpu")
    fc1, fc2 = t.model.net.fc1, t.model.net.fc2
    with torch.no_grad():
        fc1.parametrizations["weight"].original[[0, 3, 5]] = 0  # 3 of 16 rows
        fc2.parametrizations["weight"].original[[1, 2, 7, 8]] = 0  # 4 of 12 rows
    train = Named(("loss", "ce", t.loss_terms[0].value_name, "correct", "count"), torch.tensor([1.0, 1.0, 0.5, 1.0, 2.0]))
    rec = t.epoch_record(0, train, Named(("ce", "correct", "count"), torch.tensor([1.0, 1.0, 2.0])), {"base": 0.1}, 0.0)
    expected = _published([(3072 * 16, 3, 16, 4), (16 * 12, 4, 12, 4), (12 * 10, 0, 10, 6)], 6, 4)
    assert rec["published_bops"] == pytest.approx(expected, rel=1e-12)
    # the paper's: every zero weight counted, against a dense 32-bit model with 32-bit activations
    macs = [3072 * 16, 16 * 12, 12 * 10]
    density = [float((lin.weight != 0).double().mean()) for lin in (fc1, fc2, t.model.net.fc3)]
    assert density[0] <= 1 - 3 / 16 and density[1] <= 1 - 4 / 12  # the rows, and the dead zone's zeros
    paper = sum(m * d * b * 32 for m, d, b in zip(macs, density, [4, 4, 32])) / (sum(macs) * 32 * 32)
    assert rec["relative_bops"] == pytest.approx(paper, rel=1e-12)
    layers = rec["published_bops_layers"]
    assert list(layers) == ["net.fc1", "net.fc2", "net.fc3"]
    assert [v["bits"] for v in layers.values()] == [4, 4, 6]
    assert layers["net.fc1"]["row_sparsity"] == 3 / 16 and layers["net.fc2"]["row_sparsity"] == 4 / 12
    assert layers["net.fc2"]["relative"] == pytest.approx((1 - 3 / 16) * (1 - 4 / 12) * 4 / 6, rel=1e-12)
    assert layers["net.fc3"]["relative"] == pytest.approx(1 - 4 / 12, rel=1e-12)


def test_relative_bops_function_edges():
    assert relative_bops([]) == {"relative": None, "layers": {}}
    one = relative_bops([{"name": "a", "macs": 10.0, "row_sparsity": 1.0, "bits": 4}], 8, 8)
    assert one["relative"] == 0.0
    dense = relative_bops([{"name": "a", "macs": 10.0, "row_sparsity": 0.0, "bits": None}], 8, 8)
    assert dense["relative"] == 1.0 and dense["layers"]["a"]["bits"] == 8


def test_published_config_trains_and_logs_bops_every_epoch(tmp_path, capsys):
    assert main(["--config", write(tmp_path, cfg_dict(tmp_path))]) == 0
    out = capsys.readouterr().out
    (run,) = [os.path.join(tmp_path / "runs", x) for x in os.listdir(tmp_path / "runs")]
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert 0 < r["relative_bops"] <= 1 and 0 < r["published_bops"] <= 1
        assert set(r["published_bops_layers"]) == {"net.fc1", "net.fc2", "net.fc3"}
        assert set(r["layers"]) == {"net.fc1", "net.fc2", "net.fc3"}  # per-layer sparsity and bits
        assert all({"sparsity", "bits"} <= set(v) for v in r["layers"].values())
    # the paper's figure of the last epoch is the compression report's
    rep = json.loads((pathlib.Path(run) / "compression_report.json").read_text())
    assert recs[-1]["relative_bops"] == pytest.approx(rep["totals"]["relative_bops"], rel=1e-12)
    assert f"relative BOPs {recs[-1]['relative_bops']:.4g}" in out
    # the published one: the formula applied to the saved weights
    model, _, _ = load_model(os.path.join(run, "checkpoint.th"))
    layers = []
    for name in ("fc1", "fc2", "fc3"):
        lin = getattr(model.net, name)
        w = lin.weight.detach()
        bits = int(lin.parametrizations["weight"][0].get_bitwidth())
        layers.append((lin.in_features * lin.out_features, int((w.abs().sum(1) == 0).sum()), w.shape[0], bits))
    assert recs[-1]["published_bops"] == pytest.approx(_published(layers, 8, 8), rel=1e-9)
    assert [v["bits"] for v in recs[-1]["published_bops_layers"].values()] == [x[3] for x in layers]


def test_eval_bobs_false_logs_only_the_papers_bops(tmp_path):
    d = cfg_dict(tmp_path, eval_bobs=False, epochs=1)
    t = Trainer.from_config(config_from_dict(d), "cpu")
    os.makedirs(tmp_path / "run")
    recs = t.fit(str(tmp_path / "run"), report=False)
    assert "published_bops" not in recs[0] and "published_bops_layers" not in recs[0]
    assert 0 < recs[0]["relative_bops"] <= 1


def test_one_name_one_figure(tmp_path, capsys):
    """A budget run with milestones (where the two figures differ most): every
    place that says "relative BOPs" -- the epoch lines, the budget's value, the
    curves' title and panel, the runs table and chart, the compression report --
    shows the paper's figure; the published one appears only as published_bops."""
    from codeq.plots import runs_figure, training_curves_figure
    from codeq.report import _runs_table, format_report

    d = cfg_dict(tmp_path, epochs=4, loss_terms=[], budget={"metric": "rel_bops", "milestones": [0.2, 0.1]},
                 optimizer={"type": "adamw", "param_groups": {"base": {"lr": 0.001},
                                                              "dz": {"lr": 0.05, "weight_decay": 1.0}}})
    assert main(["--config", write(tmp_path, d)]) == 0
    out = capsys.readouterr().out
    (run,) = [os.path.join(tmp_path / "runs", x) for x in os.listdir(tmp_path / "runs")]
    recs = read_metrics(run)
    assert any(abs(r["relative_bops"] - r["published_bops"]) > 0.05 for r in recs)  # two different figures
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ") and "time" in ln]
    assert len(lines) == len(recs)
    for ln, r in zip(lines, recs):
        shown = float(re.search(r"relative BOPs ([0-9.e-]+)", ln).group(1))
        assert shown == pytest.approx(r["relative_bops"], rel=1e-3)
        assert r["budget"]["value"] == pytest.approx(r["relative_bops"], rel=1e-12)
        assert f"{r['published_bops']:.4g}" not in ln.replace(f"{r['relative_bops']:.4g}", "")
    fig = training_curves_figure(recs, "b")
    assert f"relative BOPs {recs[-1]['relative_bops']:.4f}" in fig._suptitle.get_text()
    (panel,) = [ax for ax in fig.axes if "relative BOPs" in ax.get_title()]
    assert list(panel.get_lines()[0].get_ydata()) == [r["relative_bops"] for r in recs]
    table = _runs_table([{"name": "b", "records": recs}])
    assert f"{recs[-1]['relative_bops']:.4f}" in table.splitlines()[1]
    chart = runs_figure([{"name": "b", "records": recs}])
    assert list(chart.axes[0].get_lines()[0].get_xdata()) == [r["relative_bops"] for r in recs]
    rep = json.loads((pathlib.Path(run) / "compression_report.json").read_text())
    assert f"relative BOPs: {recs[-1]['relative_bops']:.4g}" in format_report(rep)


def test_bops_keys_are_checked():
    from codeq.train.config import ConfigError

    for k, v in (("default_weight_bitrate", 0), ("default_activation_bitrate", 8.5), ("eval_bobs", "yes")):
        with pytest.raises(ConfigError, match=k):
            config_from_dict(cfg_dict(pathlib.Path("unused"), **{k: v}))
