#!/usr/bin/env python
"""One command per table of the CoDeQ paper: train its rows, collect the runs,
print them beside the paper's numbers.

    # Table 2 (ResNet-20, CIFAR-10) as the paper ran it: 3 seeds x 3 rows, 300 epochs each
    python benchmarks/paper_table.py --table 2 --device cuda --data data
    # Table 5 (TinyViT-5M, CIFAR-10 at 224x224)
    python benchmarks/paper_table.py --table 5 --device cuda --data data
    # a short schedule, with the budget rows that reach the paper's relative BOPs in it
    python benchmarks/paper_table.py --table 2 --device cpu --epochs 20 --warmup 2 --seeds 0 \\
        --rows baseline fixed4_budget mixed mixed_budget

Each (row, seed) is one ``run_training.py`` process writing ``RUNS/<row>-seed<s>-<time>``;
a finished run is reused, an unfinished one resumed (``--resume``), so the command can be
stopped and started again.  Then every run is collected into ``--json`` as
``{"table", "runs": [...]}``, one record per run (row, seed, epochs, val_acc, rel_bops,
mean_bits, sparsity, export, export_val_acc, train_hours, config, budget, commit), and with
``--results DIR`` its metrics.jsonl, config, compression report, pictures and compact
export are copied to ``DIR/<row>-seed<s>/``; the runs chart goes to ``DIR``.

``--collect ROW=RUN_DIR ...`` collects runs made by hand instead of training.

Numbers: val_acc is the run's last epoch on the 10,000 test images; rel_bops, sparsity
and mean_bits come from the compression report of the final model (relative BOPs as the
paper's Eqs. 20-22, 32-bit activations; mean_bits weighted by the layers' sizes); the
export is loaded back with ``codeq.export.load`` and evaluated on the test images again
(``export_val_acc``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from codeq._io import read_jsonl, write_json  # noqa: E402
from codeq.export import export_checkpoint, load as load_export  # noqa: E402
from codeq.report import compare_runs  # noqa: E402
from codeq.train.config import load_config  # noqa: E402
from codeq.train.data import build_datasets  # noqa: E402
from codeq.train.precision import wants_channels_last  # noqa: E402

PAPER_EPOCHS = {2: 300, 5: 200}  # the paper's schedules (section 6.1)
THETA_LR = 1e-3  # the paper's lr on theta from scratch


@dataclasses.dataclass
class Row:
    name: str
    config: str
    overrides: tuple = ()
    paper_acc: tuple | None = None  # (mean, std) top-1 %, the paper's
    paper_bops: tuple | None = None  # (mean, std) relative BOPs %, the paper's
    budget: float | None = None  # relative BOPs target (fraction): a budget row


# The paper's Tables 2 and 5 (shared/paper/RESULTS.md, copied from the paper's v1).
TABLES = {
    2: ("ResNet-20, CIFAR-10", [
        Row("baseline", "configs/paper/resnet20_cifar10_baseline.yaml", (), (91.70, None), (100.0, None)),
        Row("fixed4", "configs/paper/resnet20_cifar10_fixed4.yaml", (), (91.88, 0.15), (2.95, 0.12)),
        Row("mixed", "configs/paper/resnet20_cifar10_mixed.yaml", (), (91.86, 0.10), (2.61, 0.08)),
        Row("fixed4_budget", "configs/paper/resnet20_cifar10_fixed4.yaml", (), (91.88, 0.15), (2.95, 0.12), 0.0295),
        Row("mixed_budget", "configs/paper/resnet20_cifar10_mixed.yaml", (), (91.86, 0.10), (2.61, 0.08), 0.0261),
    ]),
    5: ("TinyViT-5M, CIFAR-10", [
        Row("baseline", "configs/paper/tinyvit_cifar10_mixed.yaml", ("quantizer=null", "loss_terms=[]"),
            (87.99, 0.09), (100.0, None)),
        Row("fixed4", "configs/paper/tinyvit_cifar10_fixed4.yaml", (), (87.86, 0.19), (2.15, 0.04)),
        Row("mixed", "configs/paper/tinyvit_cifar10_mixed.yaml", (), (87.85, 0.21), (1.66, 0.01)),
        Row("fixed4_budget", "configs/paper/tinyvit_cifar10_fixed4.yaml", (), (87.86, 0.19), (2.15, 0.04), 0.0215),
        Row("mixed_budget", "configs/paper/tinyvit_cifar10_mixed.yaml", (), (87.85, 0.21), (1.66, 0.01), 0.0166),
    ]),
}
DEFAULT_ROWS = ("baseline", "fixed4", "mixed")


def row_overrides(row: Row, table: int, args) -> list[str]:
    """The ``--set`` list of one row under this command's options."""
    out = list(row.overrides) + [f"dataset.root={args.data}", f"save_dir={args.runs}"]
    if args.epochs is not None:
        out.append(f"epochs={args.epochs}")
    if args.warmup is not None:
        out.append(f"warmup_epochs={args.warmup}")
    if row.budget is not None:
        # A budget reaches the paper's compression in whatever schedule it is given; the logits
        # need the paper's total travel (Adam moves theta about lr per step): lr x epochs as the
        # paper's 1e-3 x its epochs.
        epochs = args.epochs or PAPER_EPOCHS[table]
        lr = THETA_LR * PAPER_EPOCHS[table] / epochs
        out += ["budget.metric=rel_bops", f"budget.target={row.budget}",
                f"optimizer.param_groups.dz.lr={lr:g}", f"optimizer.param_groups.bit.lr={lr:g}"]
    return out + list(args.set)


def finished(run_dir: str) -> bool:
    """Whether a run reached its last epoch (the trainer writes the report then, quantized or not)."""
    return os.path.isfile(os.path.join(run_dir, "compression_report.json"))


def train(row: Row, seed: int, table: int, args) -> str:
    """The run directory of (row, seed): an existing finished one, or trained (resumed) now."""
    name = f"{row.name}-seed{seed}"
    sets = row_overrides(row, table, args) + [f"seed={seed}", f"run_name={name}"]
    existing = sorted(glob.glob(os.path.join(args.runs, f"{name}-*")))
    cmd = [sys.executable, os.path.join(ROOT, "run_training.py"), "--config", row.config, "--device", args.device]
    for s in sets:
        cmd += ["--set", s]
    if existing and finished(existing[-1]):
        print(f"[{name}] finished earlier: {existing[-1]}", flush=True)
        return existing[-1]
    if existing and os.path.isfile(os.path.join(existing[-1], "checkpoint.th")):
        cmd += ["--resume", os.path.join(existing[-1], "checkpoint.th")]
    print(f"[{name}] " + " ".join(cmd), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"error: run {name} failed (command above); fix it and run this command again to resume")
    print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
    runs = sorted(glob.glob(os.path.join(args.runs, f"{name}-*")))
    return runs[-1]


@torch.no_grad()
def test_accuracy(model, cfg) -> float:
    """Top-1 of ``model`` on the validation (test) images of ``cfg``'s data set, as the trainer evaluates."""
    _, val = build_datasets(cfg)
    loader = torch.utils.data.DataLoader(val, batch_size=512, shuffle=False)
    fmt = torch.channels_last if wants_channels_last(cfg.channels_last, model) else torch.preserve_format
    correct = n = 0
    model.eval()
    for x, y in loader:
        correct += int((model(x.to(memory_format=fmt)).argmax(1) == y).sum())
        n += len(y)
    return correct / n


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(row: str, seed: int | None, run_dir: str, results: str | None, code: str) -> dict:
    """One run as a record; its files (and compact export) copied to ``results/<name>`` when given."""
    cfg = load_config(os.path.join(run_dir, "config.yaml"), device="cpu")
    recs = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    last = recs[-1]
    rep_path = os.path.join(run_dir, "compression_report.json")
    with open(rep_path, encoding="utf-8") as f:
        totals_layers = json.load(f)
    quantized = [r for r in totals_layers["layers"] if r["quantizer"] is not None]
    n = sum(r["params"] for r in quantized)
    name = row if seed is None else f"{row}-seed{seed}"
    out_dir = os.path.join(results, name) if results else os.path.join(run_dir, "collected")
    os.makedirs(out_dir, exist_ok=True)
    for f in ("metrics.jsonl", "config.yaml", "compression_report.json", "compression_report.png",
              "training_curves.png", "budget.json"):
        if os.path.isfile(os.path.join(run_dir, f)):
            shutil.copy2(os.path.join(run_dir, f), os.path.join(out_dir, f))
    export_dir = os.path.join(out_dir, "export")
    export_checkpoint(os.path.join(run_dir, "checkpoint.th"), export_dir, verbose=False)
    export_acc = test_accuracy(load_export(export_dir), cfg)
    t = totals_layers["totals"]
    rec = {
        "run": row,
        "seed": cfg.seed,
        "epochs": last["epoch"],
        "val_acc": last["val_acc"],
        "best_acc": max(r["val_acc"] for r in recs),
        "rel_bops": t["relative_bops"],
        "mean_bits": (sum(r["params"] * r["bits"] for r in quantized) / n) if n else None,
        "sparsity": t["sparsity"],
        "export": os.path.relpath(export_dir, ROOT),
        "export_val_acc": export_acc,
        "train_hours": sum(r["epoch_time"] for r in recs) / 3600,
        "config": os.path.relpath(os.path.join(out_dir, "config.yaml"), ROOT),
        "budget": last.get("budget"),
        "commit": code,
        "run_dir": os.path.relpath(run_dir, ROOT),
    }
    if abs(export_acc - last["val_acc"]) > 0:
        print(f"warning: {name}: the export's test accuracy {export_acc:.4f} differs from the run's "
              f"{last['val_acc']:.4f}", file=sys.stderr)
    return rec


def _pm(values, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _paper(v) -> str:
    if v is None:
        return "-"
    mean, std = v
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def table_text(table: int, records: list[dict]) -> str:
    title, rows = TABLES[table]
    by_name = {r.name: r for r in rows}
    lines = [f"Table {table}: {title} (paper: mean ± std of 3 runs, {PAPER_EPOCHS[table]} epochs; ours: the runs below)",
             "| row | epochs | seeds | top-1 % (paper) | top-1 % (ours) | rel. BOPs % (paper) | rel. BOPs % (ours) "
             "| mean bits (ours) | sparsity (ours) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["run"] for r in records):
        rs = [r for r in records if r["run"] == name]
        row = by_name.get(name)
        lines.append(f"| {name} | {', '.join(sorted({str(r['epochs']) for r in rs}))} | {len(rs)} | "
                     f"{_paper(row.paper_acc) if row else '-'} | {_pm([100 * r['val_acc'] for r in rs], '.2f')} | "
                     f"{_paper(row.paper_bops) if row else '-'} | {_pm([100 * r['rel_bops'] for r in rs], '.2f')} | "
                     f"{_pm([r['mean_bits'] for r in rs], '.2f')} | {_pm([r['sparsity'] for r in rs], '.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=int, choices=sorted(TABLES), required=True)
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help=f"default: {' '.join(DEFAULT_ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default="data", help="dataset.root (cifar-10-batches-py or -bin inside)")
    p.add_argument("--epochs", type=int, default=None, help="shorten the schedule (default: the paper's)")
    p.add_argument("--warmup", type=int, default=None, help="warmup_epochs (default: the config's)")
    p.add_argument("--set", action="append", default=[], help="another override for every run")
    p.add_argument("--runs", default="runs/paper", help="where the run directories go")
    p.add_argument("--results", default=None, help="copy each run's files and export here")
    p.add_argument("--json", default=None, help="the records (default: RESULTS/table<N>.json or RUNS/table<N>.json)")
    p.add_argument("--collect", nargs="+", metavar="ROW=RUN_DIR", default=None,
                   help="collect these finished runs instead of training")
    p.add_argument("--commit", default=None, help="the commit the runs were trained at (default: this checkout's "
                   "HEAD, for runs this command trains)")
    args = p.parse_args(argv)
    rows = {r.name: r for r in TABLES[args.table][1]}
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)} of table {args.table}; rows: {', '.join(rows)}")
    runs = []  # (row, seed or None, run_dir)
    if args.collect:
        for item in args.collect:
            row, sep, run_dir = item.partition("=")
            if not sep or not os.path.isdir(run_dir):
                p.error(f"--collect takes ROW=RUN_DIR with an existing directory, got {item!r}")
            runs.append((row, None, run_dir))
    else:
        for name in args.rows:
            for seed in args.seeds:
                runs.append((name, seed, train(rows[name], seed, args.table, args)))
    code = args.commit or commit()
    records = [collect(row, seed, d, args.results, code) for row, seed, d in runs]
    out = args.json or os.path.join(args.results or args.runs, f"table{args.table}.json")
    write_json(out, {"table": args.table, "title": TABLES[args.table][0], "runs": records})
    print(table_text(args.table, records))
    print(f"wrote {out}")
    if args.results:
        chart = os.path.join(args.results, "accuracy_vs_bops.png")
        compare_runs([d for _, _, d in runs], chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
