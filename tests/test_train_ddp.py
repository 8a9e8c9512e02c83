"""Multi-process training (torchrun + DistributedDataParallel) on the CPU with
gloo: 2 processes x batch b equal 1 process x batch 2b, only rank 0 writes,
resume across world sizes, a crashing rank ends the job, config errors are
one line.  Each torchrun launch takes a few seconds (2 processes import torch)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_train_cli import write

from codeq.checkpoint import load_checkpoint
from codeq.train.cli import main
from codeq.train.config import ConfigError, config_from_dict
from codeq.train.distributed import LaunchEnv, wants_distributed
from codeq.train.sampling import EpochDistributedSampler, ShardSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for one torchrun launch (a hang would be caught here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_dict(tmp_path, **over) -> dict:
    d = {
        "model": "mlp",
        "model_kwargs": {"hidden": [16]},
        "epochs": 2,
        "batch_size": 8,
        "device": "cpu",
        "workers": 0,
        "seed": 0,
        "save_dir": str(tmp_path / "runs"),
        "run_name": "t",
        "dist_timeout_min": 1.0,
        # no augmentation: the data a step sees depends only on the (seed, epoch) order
        "dataset": {"name": "synthetic", "train_size": 48, "val_size": 30, "augment": "none"},
        "quantizer": {"name": "deadzone", "kwargs": {"max_bits": 8, "fixed_bit_val": 8}, "exclude_layers": []},
        "optimizer": {"type": "adamw", "param_groups": {
            "base": {"lr": 0.001}, "dz": {"lr": 0.01, "weight_decay": 2.5}, "bit": {"lr": 0.01}}},
        "loss_terms": [{"name": "group_lasso", "lambda": 1.0, "kwargs": {"lambda_linear": 0.001, "lambda_conv": 0.001}}],
    }
    d.update(over)
    return d


def torchrun(args, cwd, nproc=2, env=None, timeout=TIMEOUT, script=None):
    """run_training.py (or ``script``) under torchrun with ``nproc`` CPU processes."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    e.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           script or os.path.join(REPO, "run_training.py")] + list(args)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)
    r.seconds = time.monotonic() - t0
    return r


def run_dirs(path):
    return sorted(glob.glob(os.path.join(str(path), "*")))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_models_close(a: dict, b: dict, what: str, atol=2e-5, rtol=1e-4):
    assert set(a) == set(b), what
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=rtol), (
            what, k, (a[k].float() - b[k].float()).abs().max().item())


# ------------------------------------------------------------- fast, no processes --
def test_sampler_global_batches_equal_single_process_batches(tmp_path):
    """Batch k of W ranks together = batch k of one process with a W x larger
    batch, for the shuffled (seed, epoch) order; val shards cover every item once."""
    from codeq.train.data import build_loaders
    from codeq.train.sampling import epoch_seed
    from codeq.train.distributed import DistContext

    ds = [(torch.tensor(float(i)), i) for i in range(48)]
    val = [(torch.tensor(float(i)), i) for i in range(7)]
    cpu = torch.device("cpu")
    single = build_loaders(config_from_dict(cfg_dict(tmp_path, batch_size=16, seed=5)), ds, val, cpu)
    ranks = [build_loaders(config_from_dict(cfg_dict(tmp_path, batch_size=8, seed=5)), ds, val, cpu,
                           dist=DistContext(r, 2, r, enabled=True)) for r in range(2)]
    orders = []
    for epoch in (0, 3):
        single[2].manual_seed(epoch_seed(5, epoch))  # what the trainer does each epoch
        one = [b[1].tolist() for b in single[0]]
        two = []
        for tr, _, _ in ranks:
            tr.sampler.set_epoch(epoch)
            two.append([b[1].tolist() for b in tr])
        assert len(one) == len(two[0]) == len(two[1]) == 3
        for k in range(3):
            assert sorted(two[0][k] + two[1][k]) == sorted(one[k])
        orders.append(one)
    assert orders[0] != orders[1]  # reshuffled per epoch
    assert sorted(y for _, va, _ in ranks for b in va for y in b[1].tolist()) == list(range(7))
    # uneven: padded to equal length per rank
    s = [EpochDistributedSampler(list(range(5)), 2, r) for r in range(2)]
    assert len(list(s[0])) == len(list(s[1])) == 3
    v = [list(ShardSampler(list(range(5)), 2, r)) for r in range(2)]
    assert v == [[0, 2, 4], [1, 3]] and [len(ShardSampler(list(range(5)), 2, r)) for r in range(2)] == [3, 2]


def test_config_keys_and_launch_decision(tmp_path):
    cfg = config_from_dict(cfg_dict(tmp_path))
    assert cfg.distributed == "auto"
    d = cfg_dict(tmp_path)
    d.pop("dist_timeout_min")
    c = config_from_dict(d)
    assert (c.distributed, c.sync_bn, c.dist_timeout_min) == ("auto", False, 30.0)
    for v, want in (("auto", "auto"), (True, True), (False, False), (1, True)):
        assert config_from_dict(cfg_dict(tmp_path, distributed=v)).distributed == want
    for bad in ("yes", 2, [1]):
        with pytest.raises(ConfigError, match="distributed must be auto, true or false"):
            config_from_dict(cfg_dict(tmp_path, distributed=bad))
    for bad in (0, -1, float("inf")):
        with pytest.raises(ConfigError, match="dist_timeout_min"):
            config_from_dict(cfg_dict(tmp_path, dist_timeout_min=bad))
    one, two = LaunchEnv(), LaunchEnv(rank=1, world_size=2, local_rank=1, launched=True)
    assert not wants_distributed("auto", one) and wants_distributed("auto", two)
    assert wants_distributed(True, one) and not wants_distributed(False, one)
    with pytest.raises(ConfigError, match="distributed is false"):
        wants_distributed(False, two)


def test_distributed_true_single_process(tmp_path, capsys):
    """distributed: true without torchrun: a one-process group, DDP code path, same files."""
    assert main(["--config", write(tmp_path, cfg_dict(tmp_path, epochs=1, distributed=True))]) == 0
    out = capsys.readouterr().out
    assert "distributed: 1 process(es), backend gloo" in out
    (run,) = run_dirs(tmp_path / "runs")
    ckpt = load_checkpoint(os.path.join(run, "checkpoint.th"))
    assert not any(k.startswith("module.") for k in ckpt["model"])
    import torch.distributed as dist

    assert not dist.is_initialized()  # torn down at the end


# ------------------------------------------------------------ torchrun, 2 gloo ranks --
def test_ddp_equals_single_process_global_batch_and_resume_across_world_sizes(tmp_path):
    """2 processes x batch 8 == 1 process x batch 16 (same samples per step,
    DDP averages the gradients, incl. logit_dz / logit_bit); only rank 0
    writes; a 2-process checkpoint resumes with 1 process and vice versa."""
    cfg = write(tmp_path, cfg_dict(tmp_path))
    one = ["--set", "batch_size=16"]

    # 1 process, batch 16: epoch 1, keep its checkpoint, then epoch 2 by --resume
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 's'}", "--stop-after", "1"] + one) == 0
    (s_run,) = run_dirs(tmp_path / "s")
    s1_path = str(tmp_path / "s1.th")
    shutil.copy(os.path.join(s_run, "checkpoint.th"), s1_path)
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 's'}", "--resume",
                 os.path.join(s_run, "checkpoint.th")] + one) == 0
    s1, s2 = load_checkpoint(s1_path), load_checkpoint(os.path.join(s_run, "checkpoint.th"))
    init = config_from_dict(s1["config"])
    from codeq.train.trainer import build_run_model as build_model

    torch.manual_seed(init.seed)
    m0 = build_model(init).state_dict()
    moved = [k for k in m0 if "logit" in k and not torch.equal(m0[k], s2["model"][k])]
    assert any("logit_dz" in k for k in moved) and any("logit_bit" in k for k in moved)  # they learn

    # 2 processes, batch 8, epoch 1 only
    r = torchrun(["--config", cfg, "--set", f"save_dir={tmp_path / 'd'}", "--stop-after", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (d_run,) = run_dirs(tmp_path / "d")
    assert set(os.listdir(d_run)) - {"best.th"} == {"checkpoint.th", "config.yaml", "metrics.jsonl",
                                                     "training_curves.png"}
    assert r.stdout.count("run directory:") == 1 and r.stdout.count("epoch 1/2 train_loss") == 1
    assert "global batch 16" in r.stdout
    assert "Traceback" not in r.stderr and "error" not in r.stderr.lower(), r.stderr
    d1 = load_checkpoint(os.path.join(d_run, "checkpoint.th"))
    assert d1["epoch"] == 1 and not any(k.startswith("module.") for k in d1["model"])
    assert_models_close(d1["model"], s1["model"], "2 x 8 vs 1 x 16 after epoch 1")
    rd, rs = read_metrics(d_run), read_metrics(s_run)
    assert [x["epoch"] for x in rd] == [1]
    for k in ("train_loss", "train_ce", "val_loss", "val_acc"):  # metrics over the whole data set
        assert rd[0][k] == pytest.approx(rs[0][k], rel=1e-4, abs=1e-5), k

    # 2-process checkpoint -> 1 process (batch 16) for epoch 2: equals the 1-process run
    assert main(["--config", cfg, "--resume", os.path.join(d_run, "checkpoint.th")] + one) == 0
    assert run_dirs(tmp_path / "d") == [d_run]
    assert [x["epoch"] for x in read_metrics(d_run)] == [1, 2]
    assert_models_close(load_checkpoint(os.path.join(d_run, "checkpoint.th"))["model"], s2["model"], "2->1 resume")

    # 1-process checkpoint -> 2 processes (batch 8) for epoch 2
    e_run = tmp_path / "e" / "t-resumed"
    e_run.mkdir(parents=True)
    shutil.copy(s1_path, e_run / "checkpoint.th")
    shutil.copy(os.path.join(s_run, "config.yaml"), e_run / "config.yaml")
    (e_run / "metrics.jsonl").write_text(json.dumps(rs[0]) + "\n")
    r = torchrun(["--config", cfg, "--resume", str(e_run / "checkpoint.th")], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert run_dirs(tmp_path / "e") == [str(e_run)]
    assert [x["epoch"] for x in read_metrics(e_run)] == [1, 2]
    assert r.stdout.count("done:") == 1 and r.stdout.count("epoch 2/2 train_loss") == 1
    e2 = load_checkpoint(str(e_run / "checkpoint.th"))
    assert e2["epoch"] == 2
    assert_models_close(e2["model"], s2["model"], "1->2 resume")


def test_crashing_rank_ends_the_job(tmp_path):
    """Rank 1 raises at its first step while rank 0 waits in the gradient
    all-reduce: the job exits non-zero, well within the timeout, no checkpoint."""
    cfg = write(tmp_path, cfg_dict(tmp_path, epochs=1))
    crash = tmp_path / "crash_rank1.py"  # the trainer's CLI with rank 1's training step made to fail
    crash.write_text(
        "import os, sys\n"
        "from codeq.train.cli import main\n"
        "from codeq.train.trainer import Trainer\n"
        "def step(self, x, y):\n"
        "    if self.dist.rank == 1:\n"
        "        raise RuntimeError('simulated crash on rank 1')\n"
        "    return Trainer.train_step(self, x, y)\n"
        "Trainer.step = step\n"
        "sys.exit(main())\n")
    r = torchrun(["--config", cfg], cwd=tmp_path, timeout=90, script=str(crash))
    assert r.returncode != 0, r.stdout + r.stderr
    assert "simulated crash on rank 1" in r.stderr
    assert r.seconds < 60, r.seconds
    assert not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.th"))


def test_config_error_once_under_torchrun(tmp_path):
    """A config mistake: every rank exits 2 (torchrun reports the failure), one error line from rank 0."""
    d = cfg_dict(tmp_path, epochs=1)
    d["batch_sise"] = 8
    r = torchrun(["--config", write(tmp_path, d)], cwd=tmp_path, timeout=90)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("error: unknown key 'batch_sise'"), r.stderr
    assert "exitcode  : 2" in r.stderr  # torchrun's failure summary names our exit code
    assert "[rank" not in r.stderr and "codeq/train" not in r.stderr  # no per-rank traceback
    assert not os.path.exists(tmp_path / "runs")


def test_error_on_one_rank_only_is_agreed(tmp_path):
    """A setup error that only rank 1 sees (e.g. a node without the GPU or the
    data set; here rank 1 alone is given --device cuda:7) is printed once, by
    rank 0, naming the rank; nothing is written and the job fails."""
    cfg = write(tmp_path, cfg_dict(tmp_path, epochs=1))
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(
        "import os, sys\n"
        "from codeq.train.cli import main\n"
        "args = sys.argv[1:] + (['--device', 'cuda:7'] if os.environ.get('RANK') == '1' else [])\n"
        "sys.exit(main(args))\n")
    e = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(wrapper), "--config", cfg]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=e, timeout=90)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "cuda:7" in errors[0] and "(on rank 1)" in errors[0], r.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_sync_bn_checks_and_conversion(tmp_path):
    """sync_bn: BatchNorm -> SyncBatchNorm in place (same parameters, same
    state-dict keys); quantized batch norms and CPU multi-process are refused."""
    from torch import nn

    from codeq.train.trainer import build_run_model as build_model
    from codeq.train.distributed import check_sync_bn, convert_sync_bn

    kw = {"num_blocks": [1, 1, 1], "width": 4}
    d = cfg_dict(tmp_path, model="resnet20", model_kwargs=kw, sync_bn=True)
    d["quantizer"]["exclude_layers"] = ["bn"]
    model = build_model(config_from_dict(d))
    keys, params = list(model.state_dict()), {id(p) for p in model.parameters()}
    with pytest.raises(ConfigError, match="needs CUDA"):
        check_sync_bn(model, torch.device("cpu"), 2)
    out = convert_sync_bn(model, torch.device("cpu"), 1)
    assert out is model and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == keys and {id(p) for p in model.parameters()} == params
    d["quantizer"]["exclude_layers"] = []
    with pytest.raises(ConfigError, match="exclude_layers"):
        check_sync_bn(build_model(config_from_dict(d)), torch.device("cuda"), 2)


def test_ddp_with_data_on_device_equals_single_process(tmp_path):
    """dataset.on_device under DDP: each rank holds the data set and takes its
    shard of the same order, so 2 x 8 equals 1 x 16 as with the DataLoader."""
    d = cfg_dict(tmp_path, epochs=1)
    d["dataset"] = dict(d["dataset"], on_device=True)
    cfg = write(tmp_path, d)
    assert main(["--config", cfg, "--set", f"save_dir={tmp_path / 's'}", "--set", "batch_size=16"]) == 0
    r = torchrun(["--config", cfg, "--set", f"save_dir={tmp_path / 'd'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (s_run,), (d_run,) = run_dirs(tmp_path / "s"), run_dirs(tmp_path / "d")
    assert_models_close(load_checkpoint(os.path.join(d_run, "checkpoint.th"))["model"],
                        load_checkpoint(os.path.join(s_run, "checkpoint.th"))["model"], "on_device 2 x 8 vs 1 x 16")
    assert read_metrics(d_run)[0]["val_acc"] == pytest.approx(read_metrics(s_run)[0]["val_acc"], abs=1e-6)
