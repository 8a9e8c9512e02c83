"""The benchmark scripts run and write the JSON they promise (tiny sizes; no timing is asserted)."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


def test_bench_quantizer_writes_json(tmp_path, bench_path, capsys):
    import bench_quantizer

    out = tmp_path / "q.json"
    assert bench_quantizer.main(["--device", "cpu", "--sizes", "1000,5000", "--no-compile", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["torch"] and data["env"]["codeq_info"]["extension_loaded"]
    rows = data["results"]
    assert [r["n"] for r in rows if r["kind"] == "deadzone"] == [1000, 5000]
    assert {r["model"] for r in rows if r["kind"] == "group_lasso"} == {"resnet20", "vit_tiny"}
    for r in rows:
        assert r["eager_ref_us"] > 0 and r["fused_us"] > 0 and r["speedup_vs_eager"] > 0
    assert "speed-up" in capsys.readouterr().out


def test_bench_quantizer_bad_input(bench_path, capsys):
    import bench_quantizer

    assert bench_quantizer.main(["--sizes", "12,x"]) == 2
    assert capsys.readouterr().err.strip().startswith("error:")


def test_bench_train_step_writes_json(tmp_path, bench_path):
    import bench_train_step

    out = tmp_path / "t.json"
    rc = bench_train_step.main(["--device", "cpu", "--models", "mlp", "--variants", "baseline,reference_qat_gl,codeq_qat_gl",
                                "--batch", "8", "--min-time", "0", "--min-reps", "2", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("mlp", "baseline"), ("mlp", "reference_qat_gl"), ("mlp", "codeq_qat_gl")]
    assert rows[0]["ratio_to_baseline"] == 1.0
    assert all(r["median_ms"] > 0 for r in rows)
    assert bench_train_step.main(["--models", "resnet99"]) == 2
    assert bench_train_step.main(["--device", "cpu", "--variants", "baseline,codeq_qat_gl_graph"]) == 2  # CUDA only


def test_bench_train_step_precision_variants(tmp_path, bench_path):
    import bench_train_step

    out = tmp_path / "t.json"
    assert bench_train_step.main(["--device", "cpu", "--models", "resnet20", "--variants",
                                  "baseline,baseline_cl,codeq_qat_gl_bf16", "--batch", "4", "--min-time", "0",
                                  "--min-reps", "1", "--out", str(out)]) == 0
    assert [r["variant"] for r in json.loads(out.read_text())["results"]] == ["baseline", "baseline_cl",
                                                                             "codeq_qat_gl_bf16"]
    assert bench_train_step.main(["--device", "cpu", "--variants", "codeq_qat_gl_tf32"]) == 2  # CUDA only


def test_bench_epoch_writes_json(tmp_path, bench_path, capsys):
    import bench_epoch

    cfg = os.path.join(os.path.dirname(BENCH), "configs", "demo.yaml")
    out = tmp_path / "e.json"
    assert bench_epoch.main(["--config", cfg, "--train-size", "64", "--epochs", "2", "--set", "workers=0",
                             "--variant", "plain=channels_last=false", "--variant", "bf16=amp=bf16",
                             "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["amp"], len(r["epoch_s"])) for r in rows] == [("plain", "none", 2), ("bf16", "bf16", 2)]
    assert rows[0]["ratio_to_first"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    assert bench_epoch.main(["--config", cfg, "--variant", "x=amp=fp8"]) == 2
    assert "unknown amp mode" in capsys.readouterr().err


def test_ab_special_paths_writes_json(tmp_path, bench_path, capsys):
    import ab_special_paths

    out = tmp_path / "ab.json"
    assert ab_special_paths.main(["--device", "cpu", "--model", "mlp", "--batch", "8", "--rounds", "1", "--block", "2",
                                  "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ab_special_paths.VARIANTS
    assert all(r["median_ms"] > 0 and r["steps"] == 1 for r in rows)
    assert rows[1]["change_vs_all_on"] == 0.0
    assert ab_special_paths.main(["--variants", "baseline,nope"]) == 2


def test_profile_step_writes_json(tmp_path, bench_path, capsys):
    import profile_step

    out = tmp_path / "p.json"
    assert profile_step.main(["--device", "cpu", "--models", "mlp", "--variants", "baseline,codeq_qat_gl",
                              "--batch", "8", "--steps", "3", "--top", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["variant"]) for r in rows] == [("mlp", "baseline"), ("mlp", "codeq_qat_gl")]
    assert all(r["mean_ms"] > 0 and len(r["top_ops"]) == 4 for r in rows)
    # the baseline step runs no codeq op
    assert not any("deadzone" in o["op"] for o in rows[0]["top_ops"])
    assert profile_step.main(["--variants", "codeq_qat_gl_compiled"]) == 2


def test_bench_data_writes_json(tmp_path, bench_path, capsys):
    import bench_data

    out = tmp_path / "d.json"
    assert bench_data.main(["--device", "cpu", "--synthetic", "--workers", "0", "--batch", "16", "--batches", "3",
                            "--warmup", "1", "--train", "mlp", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["path"], r["step"]) for r in rows] == [
        ("dataloader", "load only"), ("on_device", "load only"),
        ("dataloader", "train_step(mlp)"), ("on_device", "train_step(mlp)")]
    assert all(r["images"] == 48 and r["images_per_s"] > 0 for r in rows)
    assert "images/s" in capsys.readouterr().out


def test_bench_data_bad_input(bench_path, tmp_path, capsys):
    import bench_data

    assert bench_data.main(["--device", "cpu", "--root", str(tmp_path / "nothing"), "--batches", "1"]) == 2
    assert capsys.readouterr().err.strip().startswith("error:")


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """gpu_check.sh's plumbing (step order, budget, report, packing) without a GPU:
    DEV=cpu runs its steps on the CPU kernels."""
    import subprocess
    import tarfile

    script = os.path.join(BENCH, "gpu_check.sh")
    env = dict(os.environ, DEV="cpu", PY=sys.executable, RESULTS=str(tmp_path / "res"),
               PACK=str(tmp_path / "pack.tgz"), STEPS="train", BUDGET_S="300")
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train: passed" in r.stdout
    names = tarfile.open(tmp_path / "pack.tgz").getnames()
    assert any(n.endswith(".md") for n in names) and any(n.endswith(".log") for n in names), names
    report = next((tmp_path / "res").glob("gpu_check_*.md")).read_text()
    assert "train=passed" in report
    env["STEPS"] = "nonsense,train"  # refused before any step runs
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "unknown step 'nonsense'" in r.stdout


def test_paper_table_trains_collects_and_resumes(tmp_path, bench_path, capsys):
    """paper_table.py: each (row, seed) one trainer run, collected into the table's JSON beside the
    paper's numbers, exports that load and score as the run did; run again, it reuses the runs."""
    import paper_table

    args = ["--table", "2", "--device", "cpu", "--epochs", "2", "--warmup", "1", "--seeds", "0",
            "--rows", "baseline", "fixed4_budget", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res"), "--set", "model=mlp", "--set", "dataset.name=synthetic",
            "--set", "dataset.train_size=128", "--set", "dataset.val_size=64", "--set", "batch_size=32"]
    assert paper_table.main(args) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "res" / "table2.json").read_text())
    runs = {r["run"]: r for r in data["runs"]}
    assert set(runs) == {"baseline", "fixed4_budget"}
    for r in runs.values():
        assert r["epochs"] == 2 and r["seed"] == 0 and 0 <= r["val_acc"] <= 1
        assert r["export_val_acc"] == r["val_acc"]  # the compact export scores as the run did
        assert os.path.isfile(os.path.join(paper_table.ROOT, r["export"], "layout.json"))
    assert runs["baseline"]["rel_bops"] == 1.0 and runs["baseline"]["mean_bits"] is None
    assert runs["fixed4_budget"]["mean_bits"] == 4.0 and runs["fixed4_budget"]["budget"]["final_target"] == 0.0295
    assert "| fixed4_budget | 2 | 1 | 91.88 ± 0.15 |" in out  # beside the paper's number
    assert (tmp_path / "res" / "accuracy_vs_bops.png").is_file()
    assert paper_table.main(args) == 0  # everything finished: reused, not trained again
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_bench_onnx_writes_json(tmp_path, bench_path, capsys):
    """bench_onnx.py on a trained checkpoint: the sizes of every format, ONNX Runtime's load time,
    memory and latency against the fp32 ONNX, and the agreement with PyTorch on the test images."""
    pytest.importorskip("onnxruntime", reason="the ONNX export's optional packages (pip install 'codeq[onnx]')")
    import bench_onnx
    from codeq.train.cli import main as train_main
    import yaml

    cfg = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 1, "batch_size": 16, "device": "cpu",
           "workers": 0, "save_dir": str(tmp_path / "runs"), "run_name": "m",
           "dataset": {"name": "synthetic", "train_size": 32, "val_size": 40},
           "quantizer": {"name": "deadzone", "kwargs": {"fixed_bit_val": 4, "learnable_bit": False}},
           "optimizer": {"type": "adamw", "param_groups": {"base": {"lr": 0.001}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(tmp_path / "c.yaml")]) == 0
    (run,) = os.listdir(tmp_path / "runs")
    out = tmp_path / "o.json"
    assert bench_onnx.main([str(tmp_path / "runs" / run / "checkpoint.th"), "--rounds", "1", "--reps", "2",
                            "--loads", "1", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["bits"] == [4] and r["integer_types"] == ["INT4"]
    assert set(r["bytes"]) == {"fp32_onnx", "codeq_onnx", "codeq_onnx_qdq", "codeq_onnx_gzip", "codeq_compact"}
    assert r["ratio_to_fp32_onnx"]["codeq_onnx"] < 0.5
    assert set(r["latency_ms"]) == {f"{v}_batch{b}" for v in ("fp32", "codeq", "codeq_qdq") for b in (1, 64)}
    assert r["test_set"]["images"] == 40 and r["test_set"]["agreement"] == 1.0
    assert "| m-" in capsys.readouterr().out
