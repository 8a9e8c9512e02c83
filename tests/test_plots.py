"""The pictures (matplotlib): compression_report.png with layer names,
training_curves.png in every run directory, and the accuracy-vs-relative-BOPs
chart of several runs (``python -m codeq.report RUN_DIR ...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from codeq.models import build_model, example_input
from codeq.plots import compression_figure, runs_figure, training_curves_figure
from codeq.report import compression_report, main as report_main
from codeq.train.cli import main as train_main
from test_train_cli import read_metrics, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_picture(path, min_w=600, min_h=400):
    """A real PNG: decodes, big enough, more than a few colours."""
    assert os.path.getsize(path) > 10_000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_w and im.size[1] >= min_h, im.size
        assert len(im.convert("RGB").getcolors(1 << 20)) > 50


def records(n=5, bops=True, quantized=True):
    out = []
    for e in range(1, n + 1):
        r = {"epoch": e, "train_acc": 0.1 * e, "val_acc": 0.12 * e}
        if quantized:
            r.update(sparsity_mean=0.05 * e, sparsity_total=0.06 * e, bits_mean=8 - 0.5 * e)
        if bops:
            r["relative_bops"] = 1 - 0.1 * e
        out.append(r)
    return out


def test_compression_figure_names_the_layers():
    model = build_model("resnet20", model_kwargs={"num_blocks": [1, 1, 1], "width": 4},
                        quantizer={"name": "deadzone", "exclude_layers": ["bn", "linear"]})
    rep = compression_report(model, example_input(32))
    fig = compression_figure(rep)
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert labels == [r["name"] for r in rep["layers"]] and "linear" in labels and "conv1" in labels
    # the unquantized head is drawn grey, a legend says so
    assert fig.axes[1].get_legend() is not None


def test_training_curves_panels():
    fig = training_curves_figure(records(), "run-x")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["accuracy", "sparsity", "weight bit-width (mean over layers)",
                      "relative BOPs (of a dense 32-bit model)"]
    acc = fig.axes[0]
    assert [line.get_label() for line in acc.get_lines()] == ["train", "validation"]
    assert list(acc.get_lines()[1].get_ydata()) == pytest.approx([0.12 * e for e in range(1, 6)])
    assert "run-x: epoch 5, val_acc 0.6000 (best 0.6000), relative BOPs 0.5000" == fig._suptitle.get_text()
    # a run without quantizer or BOPs: those panels say "not logged"
    fig = training_curves_figure(records(bops=False, quantized=False))
    texts = [t.get_text() for ax in fig.axes[1:] for t in ax.texts]
    assert texts == ["sparsity: not logged", "weight bit-width (mean over layers): not logged",
                     "relative BOPs (of a dense 32-bit model): not logged"]


def test_runs_figure_one_point_per_run():
    runs = [{"name": "a", "records": records(3)}, {"name": "b", "records": records(4)}]
    fig = runs_figure(runs)
    ax = fig.axes[0]
    points = [c.get_offsets().tolist() for c in ax.collections]
    assert points == [[[pytest.approx(0.7), pytest.approx(0.36)]], [[pytest.approx(0.6), pytest.approx(0.48)]]]
    assert [t.get_text() for t in ax.texts] == ["a", "b"]


HEADLESS = """
import sys, torch
from codeq.models import build_model, example_input
from codeq.plots import runs_figure, save_figure, training_curves_figure
from codeq.report import compression_report, save_report
out = sys.argv[1]
model = build_model("mlp", model_kwargs={"hidden": [32, 16]}, quantizer={"name": "deadzone"})
save_report(compression_report(model, example_input(32)), out)
recs = [{"epoch": e, "train_acc": 0.1 * e, "val_acc": 0.1 * e, "sparsity_mean": 0.1, "sparsity_total": 0.1,
         "bits_mean": 6, "relative_bops": 0.5} for e in range(1, 4)]
save_figure(training_curves_figure(recs, "t"), out + "/training_curves.png")
save_figure(runs_figure([{"name": "t", "records": recs}]), out + "/runs.png")
import matplotlib
print(matplotlib.get_backend())
"""


def test_figures_render_headless(tmp_path):
    """No display, no backend chosen: the figures are drawn all the same."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    r = subprocess.run([sys.executable, "-c", HEADLESS, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("compression_report.png", "training_curves.png", "runs.png"):
        assert_picture(tmp_path / name)


def _train(tmp_path, name, lam, epochs=2):
    d = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": epochs, "batch_size": 16, "device": "cpu",
         "workers": 0, "save_dir": str(tmp_path / "runs"), "run_name": name,
         "dataset": {"name": "synthetic", "train_size": 48, "val_size": 16},
         "quantizer": {"name": "deadzone", "kwargs": {"init_bit_logit": 0.5}},
         "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.002}}},
         "loss_terms": [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": lam}}]}
    assert train_main(["--config", write(tmp_path, d, f"{name}.yaml")]) == 0
    (run,) = [os.path.join(tmp_path / "runs", x) for x in os.listdir(tmp_path / "runs") if x.startswith(name)]
    return run


def test_a_run_draws_its_pictures_and_runs_compare_on_one_chart(tmp_path, capsys):
    a = _train(tmp_path, "lam0", 0.0)
    b = _train(tmp_path, "lam1", 0.01, epochs=3)
    for run in (a, b):
        assert_picture(os.path.join(run, "training_curves.png"))
        assert_picture(os.path.join(run, "compression_report.png"))
    capsys.readouterr()
    out_png = tmp_path / "sweep.png"
    assert report_main([a, b, "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert_picture(out_png)
    table = out.splitlines()
    assert table[0].split() == ["run", "epochs", "val_acc", "best", "rel", "BOPs", "sparsity", "bits"]
    last_b = read_metrics(b)[-1]
    row_b = next(line for line in table if line.startswith(os.path.basename(b))).split()
    assert row_b[1:5] == ["3", f"{last_b['val_acc']:.4f}", row_b[3], f"{last_b['relative_bops']:.4f}"]
    assert table[-1] == f"wrote {out_png}"


def test_runs_chart_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert report_main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {empty} is not a run directory: it has no metrics.jsonl\n"
    ckpt = tmp_path / "x.th"
    ckpt.write_bytes(b"0")
    assert report_main([str(empty), str(ckpt)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_acc": 0.5}) + "\n")
    assert report_main([str(old)]) == 2
    assert "none of the runs logged relative_bops" in capsys.readouterr().err


@pytest.mark.parametrize("every, drawn_after", [(0.0, [1, 2, 3]), (1e9, [1, 3])])
def test_curves_redrawn_at_most_every_so_often_and_after_the_last_epoch(tmp_path, monkeypatch, every, drawn_after):
    from codeq.train import trainer as trainer_mod
    from codeq.train.config import config_from_dict

    d = {"model": "mlp", "model_kwargs": {"hidden": [8]}, "epochs": 3, "batch_size": 16, "device": "cpu",
         "workers": 0, "dataset": {"name": "synthetic", "train_size": 16, "val_size": 16},
         "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.001}}}}
    t = trainer_mod.Trainer.from_config(config_from_dict(d), "cpu")
    drawn = []
    monkeypatch.setattr(trainer_mod, "CURVES_EVERY_S", every)
    monkeypatch.setattr(trainer_mod, "training_curves_figure", lambda recs, title: drawn.append(len(recs)) or
                        training_curves_figure(recs, title))
    t.fit(str(tmp_path), report=False)
    assert drawn == drawn_after  # epochs in metrics.jsonl at each drawing
    assert_picture(tmp_path / "training_curves.png")
