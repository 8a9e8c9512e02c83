"""Compression report of a (quantized) model: sparsity, bit-widths, MACs and
bit operations (BOPs, arXiv 2512.12981 Eqs. 20-22).

Per layer (every nn.Linear / conv layer, plus any other module whose
``weight`` carries a quantizer)::

    MACs      dense multiply-accumulates per sample
              conv : out_numel_per_sample * in_channels/groups * prod(kernel)
              linear: in_features * out_features * rows, rows = out_numel / out_features
                      (the token count for the linears of a ViT)
    density   nonzero / params  (nonzero = count of ŵ != 0)
    BOPs      MACs * density * b_w * b_a
    dense     MACs * 32 * 32
    relative  Σ BOPs / Σ dense BOPs   (the paper's metric)
    storage   Σ params * b_w * density   (bits)

``b_w`` is the quantizer's bit-width (32 for a layer without a quantizer; a
disabled quantizer keeps its bit-width and is flagged ``enabled=False``),
``b_a`` the activation bit-width (``act_bits``, default 32).

The trainer logs this relative BOPs every epoch (``relative_bops``, from
:class:`CompressionMeter`).  ``eval_bobs`` adds the published trainer's ratio
under its own name, ``published_bops`` (:func:`relative_bops`): pruned output
channels (whole rows of ŵ) rather than single weights, and 8-bit activations
and reference weights by default.

Command line: ``python -m codeq.report CHECKPOINT [--out DIR] [--act-bits 32]``,
or ``python -m codeq.report RUN_DIR [RUN_DIR ...] [--out CHART.png]`` for a
table of runs and their accuracy-vs-relative-BOPs chart (and, for runs with
budget milestones, their table and ``milestones.png``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq._io import read_jsonl, write_json
from codeq.checkpoint import load_model
from codeq.errors import ConfigError
from codeq.levels import plain_state_dict
from codeq.models import example_input
from codeq.parametrize import iter_quantizers
from codeq.plots import compression_figure, milestones_figure, runs_figure, save_figure

__all__ = ["compression_report", "format_report", "layer_macs", "relative_bops", "save_report", "main",
           "ReportError", "CompressionMeter", "METRICS"]

DENSE_BITS = 32


class ReportError(RuntimeError):
    """A report could not be made (bad checkpoint, bad input)."""


# -------------------------------------------------------------- helpers --
def _layer_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


def _type_name(m: nn.Module) -> str:
    cls = type(m)
    if parametrize.is_parametrized(m) and cls.__bases__ and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def _quantizer_bits(q: nn.Module) -> float:
    if hasattr(q, "get_bitwidth"):
        return float(q.get_bitwidth())
    if hasattr(q, "bitwidth"):
        return float(q.bitwidth)
    return float(DENSE_BITS)


def _batch_size(x) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, (tuple, list)):
        for t in x:
            if isinstance(t, torch.Tensor):
                return _batch_size(t)
    if isinstance(x, dict):
        for t in x.values():
            if isinstance(t, torch.Tensor):
                return _batch_size(t)
    raise ReportError("compression_report: example_input must be a tensor (or a tuple/list/dict holding one)")


def _call(model: nn.Module, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _out_numel(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].numel()
    return 0


# --------------------------------------------------------------- report --
def compression_report(model: nn.Module, example_input, act_bits: int = 32) -> dict:
    """Per-layer and total sparsity, bit-widths, MACs and BOPs of ``model``.

    Runs one forward pass of ``example_input`` (eval mode, no grad) with hooks
    on the layers to measure their output sizes; numbers are per sample
    (divided by the batch size of ``example_input``).  The modules' train/eval
    flags are restored afterwards.  Returns a JSON-serialisable dict with keys
    ``layers`` (list, module order), ``totals``, ``act_bits``, ``batch_size``.
    """
    if isinstance(act_bits, bool) or not float(act_bits) > 0:
        raise ReportError(f"compression_report: act_bits must be a positive number, got {act_bits!r}")
    act_bits = float(act_bits)
    batch = _batch_size(example_input)
    if batch <= 0:
        raise ReportError("compression_report: example_input has batch size 0")

    quantizers = {}
    for name, module, q in iter_quantizers(model):
        quantizers.setdefault(id(module), (name, q))

    targets = []  # (name, module, kind)
    for name, m in model.named_modules():
        kind = _layer_kind(m)
        if kind is None and id(m) not in quantizers:
            continue
        if kind is None and not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        targets.append((name, m, kind))

    out_numel = _output_sizes(model, example_input, [m for _, m, k in targets if k is not None])
    with torch.no_grad(), parametrize.cached():
        rows = [_layer_row(index, name, m, kind, quantizers.get(id(m)), out_numel.get(id(m), (0, 0)), batch, act_bits)
                for index, (name, m, kind) in enumerate(targets)]

    return {"act_bits": act_bits, "batch_size": batch, "layers": rows, "totals": _totals(rows)}


def _output_sizes(model: nn.Module, example_input, modules) -> dict:
    """{id(module): (output elements, calls)} of ``modules`` over one eval-mode,
    no-grad forward pass of ``example_input`` (train flags restored)."""
    sizes = {id(m): (0, 0) for m in modules}

    def hook(mod, inp, out):
        n, c = sizes[id(mod)]
        sizes[id(mod)] = (n + _out_numel(out), c + 1)

    handles = [m.register_forward_hook(hook) for m in modules]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), parametrize.cached():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    return sizes


def _macs(m: nn.Module, kind: str | None, out_per_sample: float) -> tuple[float, float | None]:
    """(dense MACs per sample, rows) of a layer from its output size: conv:
    outputs x in_channels/groups x kernel; linear: in x out x rows (rows: the
    output's leading elements, e.g. a ViT's tokens)."""
    if kind == "conv":
        k = math.prod(m.kernel_size) if isinstance(m.kernel_size, tuple) else int(m.kernel_size)
        return float(out_per_sample * (m.in_channels // m.groups) * k), None
    if kind == "linear":
        rows = out_per_sample / m.out_features if m.out_features else 0.0
        return float(m.in_features * m.out_features * rows), rows
    return 0.0, None


def layer_macs(model: nn.Module, example_input) -> list[tuple[str, nn.Module, float]]:
    """(name, module, dense MACs per sample) of every Linear and conv layer of
    ``model`` in module order, measured by one forward pass of ``example_input``."""
    layers = [(name or "(model)", m) for name, m in model.named_modules() if _layer_kind(m) is not None]
    sizes = _output_sizes(model, example_input, [m for _, m in layers])
    batch = _batch_size(example_input)
    return [(name, m, _macs(m, _layer_kind(m), sizes[id(m)][0] / batch)[0]) for name, m in layers]


def relative_bops(layers: list[dict], weight_bits: int = 8, act_bits: int = 8) -> dict:
    """The published trainer's BOPs ratio (docs/TRAINING.md, "Relative BOPs per
    epoch").  ``layers`` in module order, each ``{"name", "macs", "row_sparsity",
    "bits"}`` (``bits`` None: no active quantizer, ``weight_bits`` counted)::

        BOPs_l   = (1 - row_sparsity_{l-1}) (1 - row_sparsity_l) MACs_l  b_w,l  act_bits
        dense_l  = MACs_l  weight_bits  act_bits
        relative = sum BOPs_l / sum dense_l

    Returns ``{"relative": R, "layers": {name: {"relative", "bits", "row_sparsity"}}}``."""
    out, bops, dense, prev = {}, 0.0, 0.0, 0.0
    for layer in layers:
        b_w = int(layer["bits"]) if layer["bits"] is not None else int(weight_bits)
        r = float(layer["row_sparsity"])
        lb = (1 - prev) * (1 - r) * layer["macs"] * b_w * act_bits
        ld = layer["macs"] * weight_bits * act_bits
        out[layer["name"]] = {"relative": lb / ld if ld else None, "bits": b_w, "row_sparsity": r}
        bops, dense, prev = bops + lb, dense + ld, r
    return {"relative": bops / dense if dense else None, "layers": out}


METRICS = ("rel_bops", "sparsity", "bits", "size_bytes")


class CompressionMeter:
    """The report's totals that a training budget steers, computed on the
    model's device from the quantizers' current state (no host read)::

        rel_bops   Σ MACs·density·b_w·b_a / Σ MACs·32·32   (the report's relative BOPs)
        sparsity   1 - Σ nonzero / Σ params                (the report's sparsity)
        bits       Σ params·B / Σ params over the quantized weights
        size_bytes Σ (nonzero·B + params) / 8 over the quantized weights
                   + the bytes of every other tensor       (the export's theoretical size)

    over the Linear and conv layers (and any other quantized weight), in the
    order of :data:`METRICS`.  ``layers`` is :func:`layer_macs` of the model
    (its dense MACs, measured once); ``act_bits`` is the report's b_a (the
    trainer's report uses 32)."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module, float]], act_bits: float = 32.0):
        quantizers, packed = {}, set()
        for name, module, q in iter_quantizers(model):
            quantizers.setdefault(id(module), q)
            packed.add(f"{name}.weight" if name else "weight")
        macs = {id(m): v for _, m, v in layers}
        self.layers = [(m, macs.get(id(m), 0.0), quantizers.get(id(m))) for _, m in model.named_modules()
                       if id(m) in macs or id(m) in quantizers]
        self.act_bits = float(act_bits)
        self.other_bytes = float(sum(v.numel() * v.element_size() for k, v in plain_state_dict(model).items()
                                     if k not in packed))

    @torch.no_grad()
    def values(self) -> torch.Tensor:
        """[rel_bops, sparsity, bits, size_bytes] as one float64 tensor on the model's device."""
        nz, bits, n, macs, packed, raw_bytes = [], [], [], [], [], 0.0
        with parametrize.cached():  # each quantizer once
            for m, mac, q in self.layers:
                w = m.weight
                is_packed = q is not None and getattr(q, "enabled", True) and hasattr(q, "get_bitwidth")
                nz.append(torch.count_nonzero(w).double())
                bits.append(q.get_bitwidth().to(w.device).double() if is_packed
                            else torch.full((), float(DENSE_BITS), dtype=torch.float64, device=w.device))
                n.append(float(w.numel()))
                macs.append(mac)
                packed.append(is_packed)
                if not is_packed:
                    raw_bytes += w.numel() * w.element_size()  # the export stores it as it is
        nz, bits = torch.stack(nz), torch.stack(bits)
        dev = nz.device
        n_t = torch.tensor(n, dtype=torch.float64, device=dev)
        macs_t = torch.tensor(macs, dtype=torch.float64, device=dev)
        mask = torch.tensor(packed, dtype=torch.bool, device=dev)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        dense = sum(macs) * DENSE_BITS * DENSE_BITS
        rel = (macs_t * nz / n_t.clamp(min=1) * bits).sum() * (self.act_bits / dense) if dense else zero
        sparsity = 1 - nz.sum() / max(sum(n), 1.0)
        qn = sum(x for x, p in zip(n, packed) if p)
        mean_bits = (n_t * bits).where(mask, zero).sum() / qn if qn else zero + float("nan")
        size = (nz * bits + n_t).where(mask, zero).sum() / 8 + (raw_bytes + self.other_bytes)
        return torch.stack([rel, sparsity, mean_bits, size])


def _layer_row(index, name, m, kind, qinfo, sizes, batch, act_bits) -> dict:
    numel_out, ncalls = sizes
    w = m.weight.detach()
    params = int(w.numel())
    nonzero = int(torch.count_nonzero(w))
    row = {
        "index": index,
        "name": name or "(model)",
        "type": _type_name(m),
        "shape": list(w.shape),
        "params": params,
        "nonzero": nonzero,
        "density": nonzero / params if params else 0.0,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "quantizer": None,
        "enabled": None,
        "bits": float(DENSE_BITS),
        "deadzone_fraction": None,
        "calls": ncalls,
    }
    if qinfo is not None:
        q = qinfo[1]
        row["quantizer"] = type(q).__name__
        row["enabled"] = bool(getattr(q, "enabled", True))
        row["bits"] = _quantizer_bits(q)
        if hasattr(q, "get_deadzone_fraction"):
            row["deadzone_fraction"] = float(q.get_deadzone_fraction())

    macs, row["rows"] = _macs(m, kind, numel_out / batch)
    row["macs"] = macs
    row["bops"] = float(macs * row["density"] * row["bits"] * act_bits)
    row["dense_bops"] = float(macs * DENSE_BITS * DENSE_BITS)
    row["storage_bits"] = float(params * row["bits"] * row["density"])
    return row


def _totals(rows) -> dict:
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    macs = sum(r["macs"] for r in rows)
    bops = sum(r["bops"] for r in rows)
    dense = sum(r["dense_bops"] for r in rows)
    storage = sum(r["storage_bits"] for r in rows)
    rel = bops / dense if dense else None
    return {
        "layers": len(rows),
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "macs": macs,
        "bops": bops,
        "dense_bops": dense,
        "relative_bops": rel,
        "storage_bits": storage,
        "dense_storage_bits": float(params * DENSE_BITS),
        "compression_ratio": (params * DENSE_BITS / storage) if storage else None,
    }


# ---------------------------------------------------------------- text --
def _human(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suf}{unit}" if unit else f"{x / div:.3g}{suf}"
    if x == int(x):
        return f"{int(x)}{(' ' + unit) if unit else ''}"
    return f"{x:.3g}{(' ' + unit) if unit else ''}"


def format_report(report: dict) -> str:
    """The report as an aligned text table, one row per layer and a total row,
    ending with the line ``relative BOPs: R (1/X of a dense 32-bit model)``."""
    head = ["#", "layer", "type", "params", "nonzero", "sparsity", "bits", "dz", "MACs", "BOPs", "rel"]
    table = [head]
    for r in report["layers"]:
        bits = f"{r['bits']:g}" + ("*" if r["enabled"] is False else "")
        table.append([
            str(r["index"]), r["name"], r["type"], _human(r["params"]), _human(r["nonzero"]),
            f"{r['sparsity']:.2%}", bits,
            "-" if r["deadzone_fraction"] is None else f"{r['deadzone_fraction']:.3f}",
            _human(r["macs"]), _human(r["bops"]),
            "-" if not r["dense_bops"] else f"{r['bops'] / r['dense_bops']:.4f}",
        ])
    t = report["totals"]
    rel = t["relative_bops"]
    table.append([
        "", "total", "", _human(t["params"]), _human(t["nonzero"]), f"{t['sparsity']:.2%}", "", "",
        _human(t["macs"]), _human(t["bops"]), "-" if rel is None else f"{rel:.4f}",
    ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    left = {1, 2}

    def fmt(row):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    sep = "-" * len(fmt(head))
    lines = [fmt(head), sep] + [fmt(r) for r in table[1:-1]] + [sep, fmt(table[-1])]
    lines.append(
        f"activation bits: {report['act_bits']:g}   weight storage: {_human(t['storage_bits'] / 8, 'B')} "
        f"(dense fp32 {_human(t['dense_storage_bits'] / 8, 'B')})   dense BOPs: {_human(t['dense_bops'], 'BOPs')}   "
        f"BOPs: {_human(t['bops'], 'BOPs')}"
    )
    if any(r["enabled"] is False for r in report["layers"]):
        lines.append("* quantizer disabled (bits shown are the quantizer's; the layer runs in float)")
    if rel is None:
        lines.append("relative BOPs: n/a (no MACs measured)")
    elif rel == 0:
        lines.append("relative BOPs: 0 (every weight pruned)")
    else:
        lines.append(f"relative BOPs: {rel:.4g} (1/{1 / rel:.1f} of a dense 32-bit model)")
    return "\n".join(lines)


# ---------------------------------------------------------------- files --
def save_report(report: dict, out_dir: str, stem: str = "compression_report") -> dict:
    """Write ``<stem>.json`` and ``<stem>.png`` into ``out_dir`` (created if
    needed), each atomically.  Returns ``{"json": path, "png": path}``."""
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, f"{stem}.json")
    ppath = os.path.join(out_dir, f"{stem}.png")
    write_json(jpath, report)
    save_figure(compression_figure(report), ppath)
    return {"json": jpath, "png": ppath}


# ------------------------------------------------------------------ CLI --
def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


RUNS_CHART = "accuracy_vs_bops.png"
MILESTONES_CHART = "milestones.png"  # next to RUNS_CHART, for runs with budget milestones


def read_run(run_dir: str) -> dict:
    """``{"name", "records"}`` of a run directory (its metrics.jsonl)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ReportError(f"{run_dir} is not a run directory: it has no metrics.jsonl")
    try:
        records = read_jsonl(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {path}: {_one_line(e)}") from None
    return {"name": os.path.basename(os.path.normpath(run_dir)), "records": records}


def _runs_table(runs: list[dict]) -> str:
    head = ["run", "epochs", "val_acc", "best", "rel BOPs", "sparsity", "bits"]
    table = [head]
    for run in runs:
        last = run["records"][-1]

        def num(k, fmt):
            v = last.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        best = max(r.get("val_acc", 0.0) for r in run["records"])
        table.append([run["name"], str(last.get("epoch", "-")), num("val_acc", ".4f"), f"{best:.4f}",
                      num("relative_bops", ".4f"), num("sparsity_mean", ".4f"), num("bits_mean", ".2f")])
    return _align(table)


def compare_runs(run_dirs: list[str], out: str) -> str:
    """Print a table of the runs and draw them on one accuracy-vs-relative-BOPs
    chart at ``out``; runs without relative BOPs (older runs) are listed but
    not drawn.  Runs with budget milestones also get a table of
    them and ``milestones.png`` (accuracy at each milestone) beside ``out``."""
    runs = [read_run(d) for d in run_dirs]
    empty = [r["name"] for r in runs if not r["records"]]
    if empty:
        raise ReportError(f"no completed epoch in {', '.join(empty)} (metrics.jsonl is empty)")
    print(_runs_table(runs))
    ms_path = None
    with_ms = [r for r in runs if any(isinstance(x.get("milestone"), dict) for x in r["records"])]
    if with_ms:
        print(_milestones_table(with_ms))
        ms_path = os.path.join(os.path.dirname(os.path.abspath(out)), MILESTONES_CHART)
        try:
            save_figure(milestones_figure(with_ms), ms_path)
        except OSError as e:
            raise ReportError(f"cannot write {ms_path}: {_one_line(e)}") from None
    drawn = [r for r in runs if any(isinstance(x.get("relative_bops"), (int, float)) for x in r["records"])]
    missing = [r["name"] for r in runs if r not in drawn]
    if not drawn:
        if ms_path is not None:  # the milestones are drawn; there is nothing for the BOPs chart
            print("no accuracy-vs-relative-BOPs chart: the runs logged no relative_bops")
            return ms_path
        raise ReportError("none of the runs logged relative_bops (runs of codeq before it was logged every epoch)")
    if missing:
        print(f"not drawn (no relative_bops in their metrics.jsonl): {', '.join(missing)}")
    try:
        path = save_figure(runs_figure(drawn), out)
    except OSError as e:
        raise ReportError(f"cannot write {out}: {_one_line(e)}") from None
    if ms_path is not None:
        print(f"wrote {ms_path}")
    return path


def _milestones_table(runs: list[dict]) -> str:
    table = [["run", "metric", "target", "reached", "epoch", "val_acc"]]
    for run in runs:
        for r in run["records"]:
            m = r.get("milestone")
            if isinstance(m, dict):
                table.append([run["name"], str((r.get("budget") or {}).get("metric", "-")), f"{m['target']:g}",
                              f"{m['value']:.4g}", str(m["epoch"]), f"{m['val_acc']:.4f}"])
    return _align(table)


def _align(table: list[list[str]]) -> str:
    """Rows of cells as text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m codeq.report",
        description="A checkpoint: its compression report (sparsity, bits, BOPs per layer). "
        "Run directories: a table of the runs and one chart of their accuracy against relative BOPs.")
    p.add_argument("paths", nargs="+", metavar="CHECKPOINT | RUN_DIR",
                   help="one trainer checkpoint (.th / .pt), or one or more run directories")
    p.add_argument("--out", default=None,
                   help="a checkpoint: the directory of compression_report.json/.png (default: the checkpoint's); "
                   f"run directories: the chart's file (default: {RUNS_CHART})")
    p.add_argument("--act-bits", type=float, default=32.0, help="activation bit-width b_a of a checkpoint's report "
                   "(default 32)")
    p.add_argument("--stem", default="compression_report", help="file name stem of a checkpoint's report files")
    args = p.parse_args(argv)
    try:
        dirs = [x for x in args.paths if os.path.isdir(x)]
        if dirs:
            if len(dirs) != len(args.paths):
                raise ReportError("give either one checkpoint file or run directories, not both")
            print(f"wrote {compare_runs(dirs, args.out or RUNS_CHART)}")
            return 0
        if len(args.paths) > 1:
            raise ReportError("give one checkpoint (several paths are for run directories)")
        checkpoint = args.paths[0]
        if not args.act_bits > 0:
            raise ReportError(f"--act-bits must be positive, got {args.act_bits:g}")
        try:
            model, config, _ = load_model(checkpoint)
        except ConfigError as e:
            raise ReportError(str(e)) from None
        try:
            rep = compression_report(model, example_input(int(config.get("img_size", 32))), act_bits=args.act_bits)
        except ReportError:
            raise
        except Exception as e:
            raise ReportError(f"forward pass failed: {_one_line(e)}") from None
        print(format_report(rep))
        out = args.out or os.path.dirname(os.path.abspath(checkpoint))
        try:
            paths = save_report(rep, out, stem=args.stem)
        except OSError as e:
            raise ReportError(f"cannot write the report to {out}: {_one_line(e)}") from None
        print(f"wrote {paths['json']} and {paths['png']}")
        return 0
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
