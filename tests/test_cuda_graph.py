"""``cuda_graph: true`` (codeq/train/graph.py): a run whose steps are replayed as
CUDA graphs trains as the eager run does.  Needs a CUDA GPU (skipped elsewhere;
``pytest -m cuda`` selects these with the kernel tests).  The CPU-side errors of
the option are in test_config_validation.py."""

from __future__ import annotations

import os

import pytest
import torch
from test_train_cli import read_metrics, run_dirs, tiny, write

from codeq.checkpoint import load_checkpoint
from codeq.train.cli import main
from codeq.train.config import config_from_dict
from codeq.train.trainer import Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCH, FULL, PARTIAL = 16, 10, 5  # 10 full batches and one of 5 per epoch


def _config(tmp_path, model, graph, epochs=2):
    d = tiny(tmp_path, model, epochs=epochs, device="cuda", cuda_graph=graph, batch_size=BATCH,
             dataset={"name": "synthetic", "train_size": BATCH * FULL + PARTIAL, "val_size": 32})
    return config_from_dict(d)


def _fit(tmp_path, model, graph, sub, patch=None):
    tr = Trainer.from_config(_config(tmp_path, model, graph))
    if patch is not None:
        patch(tr)
    run = tmp_path / sub
    os.makedirs(run)
    return tr, tr.fit(str(run), report=False)


@pytest.mark.parametrize("model", ["mlp", "resnet20", "vit"])
def test_graph_run_trains_as_the_eager_run(tmp_path, model, monkeypatch):
    """Two epochs (the cosine LR moves between them, so the graph must be captured
    anew), each with a last, smaller batch that runs eagerly: the same losses and
    the same weights, BN statistics and quantizer logits as the eager run.

    cuDNN's convolution backward may sum in another order from run to run; with
    the dead-zone rounding, such ulps grow over 20 steps (on an H200, one of 16
    ResNet-20 BN running means ended 0.36% apart): deterministic cuDNN for both runs."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    eager, rec_e = _fit(tmp_path, model, False, "eager")
    graph, rec_g = _fit(tmp_path, model, True, "graph")
    g = graph.graph
    assert not g.failed
    assert g.captures == 2, g.captures
    assert g.replays == 2 * (FULL - g.warmup), g.replays  # the capture's own replay included
    assert g.eager_steps == 2 * (g.warmup + 1), g.eager_steps  # warm-up + the smaller batch
    assert rec_e[0]["lr"] != rec_e[1]["lr"]
    for a, b in zip(rec_e, rec_g):
        for k in ("train_loss", "train_ce", "val_loss", "lr"):
            assert abs(a[k] - b[k]) <= 1e-3 * max(1.0, abs(a[k])), (k, a[k], b[k])
    se, sg = eager.model.state_dict(), graph.model.state_dict()
    assert se.keys() == sg.keys()
    for k in se:
        if se[k].is_floating_point():
            torch.testing.assert_close(sg[k], se[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(sg[k], se[k]), k


def test_graph_capture_failure_falls_back_to_eager(tmp_path, capsys):
    """A step that reads a value on the host cannot be captured: one warning, and
    the run goes on eagerly to the end."""

    def host_sync(tr):
        compute = tr.compute_loss

        def with_sync(x, y):
            out = compute(x, y)
            float(out[1]["ce"])  # a host read of the CE: not allowed while capturing
            return out

        tr.compute_loss = with_sync

    tr, rec = _fit(tmp_path, "mlp", True, "run", patch=host_sync)
    assert tr.graph.failed and tr.graph.captures == 0
    assert len(rec) == 2 and all(r["train_loss"] == r["train_loss"] for r in rec)  # finite, not NaN
    err = capsys.readouterr().err
    assert err.count("could not be captured") == 1, err


def test_cli_graph_run_resumes_eagerly(tmp_path, capsys):
    """The capturable optimizer state (step counters on the device) resumes in an
    eager run and vice versa: checkpoints do not depend on cuda_graph."""
    d = tiny(tmp_path, "mlp", epochs=3, device="cuda", cuda_graph=True, batch_size=BATCH,
             dataset={"name": "synthetic", "train_size": BATCH * FULL + PARTIAL, "val_size": 32})
    cfg = write(tmp_path, d)
    assert main(["--config", cfg, "--stop-after", "1"]) == 0
    (run,) = run_dirs(tmp_path)
    ckpt = os.path.join(run, "checkpoint.th")
    assert main(["--config", cfg, "--set", "cuda_graph=false", "--stop-after", "1", "--resume", ckpt]) == 0
    assert main(["--config", cfg, "--resume", ckpt]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    assert load_checkpoint(ckpt)["config"]["cuda_graph"] is True
    err = capsys.readouterr().err
    assert "could not be captured" not in err and "Traceback" not in err, err


def test_auto_turns_graphs_on_for_cuda(tmp_path):
    tr = Trainer.from_config(_config(tmp_path, "mlp", "auto", epochs=1))
    assert tr.graph is not None
    assert tr.optimizer.defaults["fused"] is True and tr.optimizer.defaults["capturable"] is True


def test_graph_capture_beside_pin_memory_workers(tmp_path, capsys):
    """DataLoader workers with pinned memory (the pin-memory thread makes CUDA calls
    while the step is captured): the capture holds, and the run ends normally."""
    d = tiny(tmp_path, "resnet20", epochs=2, device="cuda", cuda_graph=True, batch_size=BATCH, workers=2,
             dataset={"name": "synthetic", "train_size": BATCH * 40 + PARTIAL, "val_size": 64})
    assert main(["--config", write(tmp_path, d)]) == 0
    out, err = capsys.readouterr()
    assert "steps replayed as CUDA graphs" in out
    assert "could not be captured" not in err and "Traceback" not in err, err
